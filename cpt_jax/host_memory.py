"""Host memory settings for XLA:CPU programs (`python -m cpt_jax.main`, on by default; off with
`--nokeep_host_heap`).

XLA:CPU allocates a program call's temporaries as one block (100m SFT step: 2.6 GiB) and frees
it when the call ends. glibc serves blocks above 32 MiB with mmap and unmaps them on free, so
every call page-faults its whole block anew: 692K faults and ~2.1 s of kernel time per 8.6 s
100m step on a 2-core Zen 4 EPYC. `keep_heap` has glibc map no block apart and return no freed
memory to the system, and runs single-device programs on the calling thread, so that their
temporaries come from that thread's heap and reuse the pages of the call before: there the
100m step took 6.8-7.0 s, and the small one (one step per call) ran 1.04-1.15x faster. The
cost: freed memory stays resident (100m peak 4.8-7.6 GiB instead of 4.9). The caller now waits
for each program, yet the tiny SFT, RFT and ParetoCL jobs measured the same per step.
Mallopt alone does not do it: a worker thread's heap cannot hold such a block, so XLA's
asynchronous dispatch thread maps it apart anyway. (One heap for every thread,
glibc.malloc.arena_max=1, reaches the same through XLA's own threads with dispatch left
asynchronous, but slowed the small step by 10-20%: lock contention.) Rollouts do not
page-fault either way.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import sys
from collections.abc import Mapping, Sequence

import jax

_log = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h) and the values keep_heap sets.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
SETTINGS = ((_M_MMAP_MAX, 0),        # no block is mapped apart (nor unmapped on free)
            (_M_TRIM_THRESHOLD, -1))  # freed memory stays in the heap (SIZE_MAX)

# Environment variables through which a user configures malloc; any of them wins.
MALLOC_ENV_VARS = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_",
                   "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def user_malloc_settings(environ: Mapping[str, str] = os.environ) -> list[str]:
  """The settings in `environ` through which the user chose how memory is allocated: glibc
  malloc tunables (GLIBC_TUNABLES glibc.malloc.*), MALLOC_* variables, or a preloaded allocator
  (LD_PRELOAD)."""
  found = [f"{var}={environ[var]}" for var in MALLOC_ENV_VARS if var in environ]
  if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
    found.append(f"GLIBC_TUNABLES={environ['GLIBC_TUNABLES']}")
  if "malloc" in environ.get("LD_PRELOAD", ""):
    found.append(f"LD_PRELOAD={environ['LD_PRELOAD']}")
  return found


def accelerator_plugins() -> list[str]:
  """Installed JAX backends other than the CPU (libtpu, `jax_plugins` entry points), found
  without starting a backend."""
  found = [entry.name for entry in importlib.metadata.entry_points(group="jax_plugins")]
  if importlib.util.find_spec("libtpu") is not None:
    found.append("libtpu")
  return found


def xla_runs_on_cpu(platforms: str | None = None, plugins: Sequence[str] | None = None) -> bool:
  """Whether this process's JAX programs will run on the CPU, decided before a backend starts:
  `platforms` (default jax_platforms, i.e. JAX_PLATFORMS) names 'cpu' first, or none is named
  and no accelerator plugin is installed (`plugins`, default `accelerator_plugins()`)."""
  platforms = jax.config.jax_platforms if platforms is None else platforms
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not (accelerator_plugins() if plugins is None else plugins)


def _glibc() -> ctypes.CDLL | None:
  if not sys.platform.startswith("linux"):
    return None
  libc = ctypes.CDLL(None)
  return libc if hasattr(libc, "gnu_get_libc_version") else None


_NOT_ON_CPU = "the programs will not run on the CPU"


def keep_heap() -> bool:
  """Applies SETTINGS (module docstring) to this process's glibc malloc and turns off JAX's
  asynchronous dispatch on the CPU (`jax_cpu_enable_async_dispatch`); True if it did.

  Must run before the JAX backend starts, which reads the dispatch setting once. Does nothing,
  and says why in the log (a warning, except on accelerators, where it is expected), when the
  programs will not run on the CPU (`xla_runs_on_cpu`), off glibc, when the environment
  configures malloc (`user_malloc_settings`: the user's choice wins) or when the backend has
  started.
  """
  from jax._src import xla_bridge  # no public way to ask without starting a backend
  reason = None
  libc = _glibc()
  if not xla_runs_on_cpu():
    reason = _NOT_ON_CPU
  elif libc is None:
    reason = "not glibc"
  elif user := user_malloc_settings():
    reason = f"the environment configures malloc ({', '.join(user)})"
  elif xla_bridge.backends_are_initialized():
    reason = "the JAX backend has already started (call keep_heap before any device use)"
  if reason:
    log = _log.info if reason == _NOT_ON_CPU else _log.warning
    log("host heap left as it is: %s", reason)
    return False
  for param, value in SETTINGS:
    if not libc.mallopt(param, value):
      raise OSError(f"mallopt({param}, {value}) failed")
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  _log.info("host heap kept: no mmap'd blocks, no trimming, programs run on the calling thread")
  return True
