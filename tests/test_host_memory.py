"""cpt_jax.host_memory: after keep_heap, a program's temporaries reuse the pages of the call
before (page faults counted by the kernel, ru_minflt), and the user's own malloc settings win."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cpt_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMP_MIB = 128

# Calls a one-device program with a 128 MiB temporary (exp(x), reversed) ten times; prints the
# page faults of each call.
_CALLS = f"""
import json, resource, sys
if sys.argv[1] == "keep_heap":
  from cpt_jax import host_memory
  assert host_memory.keep_heap()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)
f = jax.jit(lambda x: (jnp.exp(x)[::-1] * x).sum() + jnp.exp(x).sum())
assert f.lower(x).compile().memory_analysis().temp_size_in_bytes >= {TEMP_MIB} * 2**20
faults = []
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(faults))
"""


def _run(script: str, *args: str, xla_flags: str = "") -> str:
  """Last stdout line of `script` in a fresh CPU process, with no malloc settings of the user's."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "XLA_FLAGS", *host_memory.MALLOC_ENV_VARS)}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
  out = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, check=True, text=True,
                       capture_output=True, env=env, timeout=300).stdout
  return out.splitlines()[-1]


def _call_faults(mode: str) -> list[int]:
  return json.loads(_run(_CALLS, mode))


GLIBC_ONLY = pytest.mark.skipif(host_memory._glibc() is None, reason="glibc malloc only")


@GLIBC_ONLY
def test_a_programs_temporaries_reuse_the_pages_of_the_call_before():
  pages = TEMP_MIB * 2**20 // os.sysconf("SC_PAGE_SIZE")
  default = _call_faults("default")
  kept = _call_faults("keep_heap")
  refaulted = lambda faults: sum(f > pages / 2 for f in faults[1:])  # of the 9 later calls
  # glibc maps a block this large apart and unmaps it when freed: every call faults anew.
  assert refaulted(default) == 9, (default, pages)
  # Kept in the heap: most later calls fault nothing in (now and then one lands beside a freed
  # block that small allocations have cut into, and grows the heap).
  assert refaulted(kept) <= 4, (kept, pages)


# After keep_heap, a program over 8 CPU devices with an all-reduce still runs them together
# (the calling thread runs one-device programs only) and gets the sum.
_MESH = """
from cpt_jax import host_memory
assert host_memory.keep_heap()
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
x = jax.device_put(np.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("d")))
total = jax.jit(jax.shard_map(lambda a: jax.lax.psum((a @ a.T).sum(), "d"), mesh=mesh,
                              in_specs=P("d"), out_specs=P()))
print(float(total(x)))
"""


@GLIBC_ONLY
def test_keep_heap_runs_multi_device_programs_together():
  total = float(_run(_MESH, xla_flags="--xla_force_host_platform_device_count=8"))
  rows = np.arange(64.0).reshape(8, 8)
  # Each device holds one row: the sum of the 8 rows' squared norms.
  assert total == float((rows * rows).sum())


@pytest.mark.parametrize("environ, found", [
    ({}, []),
    ({"MALLOC_ARENA_MAX": "2"}, ["MALLOC_ARENA_MAX=2"]),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, ["GLIBC_TUNABLES=glibc.malloc.hugetlb=1"]),
    ({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}, []),
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, ["LD_PRELOAD=/usr/lib/libjemalloc.so.2"]),
    ({"LD_PRELOAD": "/usr/lib/libtcmalloc.so.4", "MALLOC_TRIM_THRESHOLD_": "0"},
     ["MALLOC_TRIM_THRESHOLD_=0", "LD_PRELOAD=/usr/lib/libtcmalloc.so.4"]),
])
def test_user_malloc_settings(environ, found):
  assert host_memory.user_malloc_settings(environ) == found


@pytest.mark.parametrize("platforms, plugins, on_cpu", [
    ("cpu", ["cuda"], True),
    ("cuda,cpu", [], False),
    ("tpu", [], False),
    ("", [], True),
    ("", ["cuda"], False),
    ("", ["libtpu"], False),
])
def test_xla_runs_on_cpu(platforms, plugins, on_cpu):
  assert host_memory.xla_runs_on_cpu(platforms, plugins) is on_cpu


@GLIBC_ONLY
def test_keep_heap_after_the_backend_started_does_nothing_and_says_why(caplog, monkeypatch):
  for var in ("GLIBC_TUNABLES", "LD_PRELOAD", *host_memory.MALLOC_ENV_VARS):
    monkeypatch.delenv(var, raising=False)
  jax.devices()
  with caplog.at_level(logging.WARNING, logger="cpt_jax.host_memory"):
    assert not host_memory.keep_heap()
  assert "backend has already started" in caplog.text


@GLIBC_ONLY
def test_keep_heap_leaves_a_user_setting_alone(caplog, monkeypatch):
  monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
  with caplog.at_level(logging.WARNING, logger="cpt_jax.host_memory"):
    assert not host_memory.keep_heap()
  assert "the environment configures malloc (MALLOC_ARENA_MAX=4)" in caplog.text


def test_keep_heap_off_the_cpu_does_nothing_and_says_why(caplog, monkeypatch):
  monkeypatch.setattr(host_memory, "xla_runs_on_cpu", lambda: False)  # e.g. a TPU host
  with caplog.at_level(logging.INFO, logger="cpt_jax.host_memory"):
    assert not host_memory.keep_heap()
  # The trainer's default on accelerators: said, not warned.
  assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
      (logging.INFO, "host heap left as it is: the programs will not run on the CPU")]
