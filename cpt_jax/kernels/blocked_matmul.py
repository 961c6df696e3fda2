"""Few-row float32 matmuls on CPU from weights stored as column blocks (an XLA FFI custom call).

A decode step multiplies a few rows by every weight matrix once. XLA:CPU's dots stream those
weights at 12-17 GB/s on a 2-core Zen 4 EPYC (small model: 17 matmuls chained, 0.9-1.3 ms per
step); `blocked_matmul.cc` reads each [K, 32] column block front to back with an 8 x 32
register tile on both cores, at 0.39-0.44 ms for the same chain (benchmarks/decode_bounds.py).

    blocks = to_blocks(kernel)                    # [K, N] -> [ceil(N / 32), K, 32]
    y = blocked_matmul(x, blocks, widths=(N,))    # x [..., K] -> [..., N], float32

The C++ source is compiled for this host (`-march=native`) on first use, with the C++
compiler of $CXX (default `c++`), into $CPT_JAX_CACHE (default ~/.cache/cpt_jax)/kernels, and
registered with XLA for the CPU platform only.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shlex
import subprocess
import tempfile
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jaxlib

BLOCK = 32  # columns per block
SOURCE = pathlib.Path(__file__).with_name("blocked_matmul.cc")
TARGET = "cpt_blocked_matmul"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
_log = logging.getLogger(__name__)


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("CPT_JAX_CACHE") or os.path.join(pathlib.Path.home(), ".cache", "cpt_jax")
  return pathlib.Path(root) / "kernels"


def _host_key() -> str:
  """What `-march=native` compiles for: the machine and its CPU's flags."""
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    flags = ""
  return f"{platform.machine()} {flags}"


@functools.cache
def library() -> ctypes.CDLL:
  """The compiled kernel library (built once per source, jaxlib, compiler and host CPU), its
  target registered with XLA. Raises RuntimeError naming the compiler's complaint when the
  build fails."""
  compiler = shlex.split(os.environ.get("CXX", "c++"))
  command = [*compiler, *FLAGS, f"-I{jax.ffi.include_dir()}"]
  key = hashlib.sha256("\0".join([SOURCE.read_text(), jaxlib.__version__, *command,
                                  _host_key()]).encode()).hexdigest()[:16]
  path = _cache_dir() / f"blocked_matmul_{key}.so"
  if not path.exists():
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
      built = pathlib.Path(tmp) / path.name
      try:
        result = subprocess.run([*command, str(SOURCE), "-o", str(built)], capture_output=True,
                                text=True)
      except OSError as e:
        raise RuntimeError(f"blocked_matmul: cannot run the C++ compiler {compiler[0]!r} "
                           f"(set CXX): {e}") from e
      if result.returncode != 0:
        raise RuntimeError(f"blocked_matmul: compiling {SOURCE.name} failed "
                           f"({shlex.join(command)}):\n{result.stderr[-4000:]}")
      os.replace(built, path)  # atomic: concurrent builders each leave a whole file
  lib = ctypes.cdll.LoadLibrary(str(path))
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, TARGET)), platform="cpu")
  return lib


@functools.cache
def available() -> bool:
  """Whether the kernel builds and loads on this host (if not, says why, once)."""
  try:
    library()
  except (RuntimeError, OSError) as e:
    _log.warning("cpt_jax.kernels.blocked_matmul is unavailable, XLA's dots run instead: %s", e)
    return False
  return True


def to_blocks(kernel: jax.Array) -> jax.Array:
  """A [K, N] kernel as float32 column blocks [ceil(N / 32), K, 32], zero columns padding N."""
  k, n = kernel.shape
  padded = jnp.pad(kernel.astype(jnp.float32), ((0, 0), (0, -n % BLOCK)))
  return padded.reshape(k, -1, BLOCK).transpose(1, 0, 2)


def blocked_matmul(x: jax.Array, *blocks: jax.Array, widths: Sequence[int]) -> jax.Array:
  """x [..., K] times the kernels of `blocks` (each from `to_blocks` of a [K, widths[i]] kernel)
  -> float32 [..., sum(widths)], the products side by side. CPU only."""
  if len(blocks) != len(widths) or not blocks:
    raise ValueError(f"blocked_matmul: {len(blocks)} kernels for {len(widths)} widths")
  k = x.shape[-1]
  for b, width in zip(blocks, widths):
    if b.ndim != 3 or b.shape[1:] != (k, BLOCK) or b.shape[0] != -(-width // BLOCK):
      raise ValueError(f"blocked_matmul: a kernel of {width} columns for x [..., {k}] must be "
                       f"[{-(-width // BLOCK)}, {k}, {BLOCK}] blocks, got {b.shape}")
  library()
  rows = x.reshape(-1, k).astype(jnp.float32)
  padded = sum(b.shape[0] for b in blocks) * BLOCK
  y = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((rows.shape[0], padded), jnp.float32))(
      rows, *(b.astype(jnp.float32) for b in blocks))
  if padded != sum(widths):
    starts = [0]
    for b in blocks[:-1]:
      starts.append(starts[-1] + b.shape[0] * BLOCK)
    y = jnp.concatenate([y[:, s:s + w] for s, w in zip(starts, widths)], axis=-1)
  return y.reshape(*x.shape[:-1], sum(widths))
