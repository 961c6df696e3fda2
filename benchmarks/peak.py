"""The float32 matmul peak of this machine, measured in the benchmark's own job: the best
GFLOP/s of square 2048^3 and 4096^3 matmuls, XLA's and (given the peers' python) PyTorch's, the
fastest GEMM either library reaches here. Shared by sft_step.py and sampler.py."""
from __future__ import annotations

import os
import subprocess
import time

import jax
import jax.numpy as jnp

TORCH_PEAK = """
import time, torch
torch.set_num_threads({threads})
for n in (2048, 4096):
  a = torch.randn(n, n)
  a @ a
  best = float("inf")
  for _ in range({repeats}):
    t0 = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - t0)
  print(n, 2 * n**3 / best / 1e9)
"""


def matmul_peak_gflops(peer_python: str | None = None, repeats: int = 5) -> dict:
  """{'xla_2048': GFLOP/s, 'xla_4096': ..., and 'torch_*' with `peer_python`}."""
  rates = {}
  for n in (2048, 4096):
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul).lower(a, a).compile()
    matmul(a, a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
      t0 = time.perf_counter()
      matmul(a, a).block_until_ready()
      best = min(best, time.perf_counter() - t0)
    rates[f"xla_{n}"] = round(2 * n**3 / best / 1e9, 1)
  if peer_python:
    code = TORCH_PEAK.format(threads=os.cpu_count(), repeats=repeats)
    proc = subprocess.run([peer_python, "-c", code], capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
      n, rate = line.split()
      rates[f"torch_{n}"] = round(float(rate), 1)
  return rates
