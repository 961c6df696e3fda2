"""What bounds a decode step of the sampler on this CPU: the memory system, the weight matmuls,
the attention, or the ops around them.

One job, on the rollout workload of `sampler.py` (`shapes.py`: 8 rows, float32, the KV cache of
64-token prompts and 64 new tokens), each part timed alone in a jitted loop of decode steps:

- `read_gb_per_s`: how fast the host streams a matrix of a given size (NumPy/OpenBLAS
  matrix-vector products, in subprocesses with 1 and with all threads): from the caches for the
  size of the model's weights, from memory for far larger ones.
- `weight_matmuls`: every weight matmul of a step with 8 rows alone, then all of them chained
  as a step runs them (decode program's XLA options, `sampler.default_compiler_options`), with
  the weights' read rate and the time the step's FLOPs take at the matmul peak (`peak.py`); and
  the chain on the column-block kernel of `cpt_jax.kernels.blocked_matmul`.
- `attention_us_per_step`: every layer's decode attention over the cache.
- `op_us`: one tiny op (an [8, 32] x [32, 32] dot) in the loop, the cost of an op's dispatch.
- `sampler_decode_step_ms`: the sampler's own step (a greedy call minus its prefill), with
  XLA's dots ('in_out') and with the column-block kernel ('blocks', the CPU default).

Usage:
  python benchmarks/decode_bounds.py --sizes=small --out=/tmp/decode_bounds.json
"""
from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app, flags

import jax
import jax.numpy as jnp
import numpy as np

import peak
import shapes
from cpt_jax.kernels import blocked_matmul
from cpt_jax.models import init_from_config
from cpt_jax.models.qwen2_5_vl import layers
from cpt_jax.rl.sampler import Sampler, default_compiler_options

_SIZES = flags.DEFINE_list("sizes", ["small"], "Model sizes (shapes.SIZES) to measure.")
_ROUNDS = flags.DEFINE_integer("rounds", 11, "Alternating timed rounds of every loop.")
_OUT = flags.DEFINE_string("out", "decode_bounds.json", "Where to write the JSON results.")

STEPS = 64  # decode steps per timed loop
ROWS = shapes.BATCH
CACHE_SLOTS = shapes.PROMPT_LEN + shapes.NEW_TOKENS - 1

READ_RATE = """
import time, numpy as np
for mb in {sizes}:
  a = np.ones((int(mb * 2**20) // 1024, 256), np.float32)
  v = np.ones(256, np.float32)
  calls = max(1, int(256 / mb))
  best = float("inf")
  for _ in range(7):
    t0 = time.perf_counter()
    for _ in range(calls):
      a @ v
    best = min(best, (time.perf_counter() - t0) / calls)
  print(mb, a.nbytes / best / 1e9)
"""


def read_rates(sizes_mb: list[float]) -> dict:
  """{'threads=N': {MB: GB/s}} for one thread and for every core (best of 7)."""
  out = {}
  for threads in sorted({1, os.cpu_count() or 1}):
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    lines = subprocess.run([sys.executable, "-c", READ_RATE.format(sizes=sizes_mb)], env=env,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    out[f"threads={threads}"] = {
        f"{float(mb):g}MB": round(float(rate), 1)
        for mb, rate in (line.split() for line in lines if line.strip())}
  return out


def _loop(step, options: dict, x: jax.Array, *operands):
  """A callable that runs a jitted fori_loop of STEPS applications of step(x, *operands) -> x
  from `x` (its first call compiles)."""
  run = jax.jit(lambda x, *ops: jax.lax.fori_loop(0, STEPS, lambda _, x: step(x, *ops), x),
                compiler_options=options)
  return lambda: jax.block_until_ready(run(x, *operands))


def _alternate(calls: dict, rounds: int) -> dict:
  """Median seconds of each call, the calls alternating after one untimed (compiling) call each."""
  for call in calls.values():
    call()
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def bench_size(size: str, peak_gflops: float, rounds: int) -> dict:
  config = shapes.text_config(size)
  t = config.text
  options = default_compiler_options("cpu", "decode")
  rng = np.random.default_rng(0)
  weight = lambda shape: jnp.asarray(rng.normal(0, 0.02, shape), jnp.float32)
  layer_shapes = shapes.layer_matmuls(config)
  head = (t.hidden_size, t.vocab_size)
  kernels = [weight(s) for _ in range(t.num_layers) for s in layer_shapes] + [weight(head)]

  def project(x, w):  # x [8, in] -> [8, in] through a matmul of w [in, out]
    y = x @ w
    reps = -(-x.shape[1] // y.shape[1])
    return x + 1e-6 * jnp.tile(y, (1, reps))[:, :x.shape[1]]

  widths = [o for _, o in layer_shapes] * t.num_layers + [head[1]]

  def chain(x, *ws, matmul=lambda x, w, width: x @ w):
    h = x
    for i in range(t.num_layers):
      qkv, o, gate_up, down = zip(ws[4 * i:4 * i + 4], widths[4 * i:4 * i + 4])
      h = h + matmul(matmul(h, *qkv)[:, :t.hidden_size], *o)
      g = matmul(h, *gate_up)
      h = h + matmul(g[:, :t.intermediate_size] * g[:, t.intermediate_size:], *down)
    return h + 1e-6 * matmul(h, ws[-1], widths[-1])[:, :h.shape[1]]

  def blocked(x, w, width):
    return blocked_matmul.blocked_matmul(x, w, widths=(width,))

  rows = lambda width: jnp.ones((ROWS, width), jnp.float32)
  singles = {f"{i}x{o}": _loop(project, options, rows(i), weight((i, o)))
             for i, o in [*layer_shapes, head]}
  loops = dict(singles, chain=_loop(chain, options, rows(t.hidden_size), *kernels),
               chain_blocks=_loop(functools.partial(chain, matmul=blocked), options,
                                  rows(t.hidden_size), *map(blocked_matmul.to_blocks, kernels)))

  head_dim = t.hidden_size // t.num_heads
  caches = [(weight((ROWS, t.num_kv_heads, head_dim, CACHE_SLOTS)) * 50,
             weight((ROWS, t.num_kv_heads, CACHE_SLOTS, head_dim)) * 50)
            for _ in range(t.num_layers)]
  slots = jnp.ones((ROWS, 1, CACHE_SLOTS), bool)

  def attend(x, *kv):
    q = jnp.broadcast_to(x, (ROWS, 1, t.num_heads, head_dim))  # x [ROWS, 1, 1, 1]
    for k, v in zip(kv[::2], kv[1::2]):
      q = q + 1e-3 * layers.attention(q, k, v, mask=slots)
    return x + q[:, :1, :1, :1]

  loops["attention"] = _loop(attend, options, jnp.ones((ROWS, 1, 1, 1), jnp.float32),
                             *[a for kv in caches for a in kv])
  tiny = weight((32, 32))
  loops["tiny_dots"] = _loop(lambda x, w: (((x @ w) @ w) @ w) @ w, options, rows(32), tiny)
  us = {name: round(1e6 * seconds / STEPS, 1)
        for name, seconds in _alternate(loops, rounds).items()}

  weight_bytes = sum(k.nbytes for k in kernels)
  flops = 2 * ROWS * weight_bytes / 4
  matmuls = {name: dict(us=us[name], gb_per_s=round(4 * np.prod([int(d) for d in name.split("x")])
                                                    / us[name] / 1e3, 1))
             for name in singles}
  return dict(
      size=size, decode_options=options, rows=ROWS, cache_slots=CACHE_SLOTS,
      weight_bytes_per_step=weight_bytes,
      weight_matmuls=dict(
          alone=matmuls, chained_us_per_step=us["chain"],
          chained_weights_gb_per_s=round(weight_bytes / us["chain"] / 1e3, 1),
          chained_blocks_us_per_step=us["chain_blocks"],
          chained_blocks_weights_gb_per_s=round(weight_bytes / us["chain_blocks"] / 1e3, 1),
          flops_per_step=flops, at_peak_us=round(1e6 * flops / (peak_gflops * 1e9), 1)),
      attention_us_per_step=us["attention"],
      op_us=round(us["tiny_dots"] / 4, 2),
      sampler_decode_step_ms=_sampler_step_ms(config))


def _sampler_step_ms(config, repeats: int = 9) -> dict:
  """{weight_layout: (greedy call - its prefill alone) / decode steps} for XLA's dots on the
  model's kernels ('in_out') and the column-block kernel ('blocks'), medians of alternating
  calls."""
  model = init_from_config(config, 0)
  prompts = np.random.default_rng(0).integers(
      1, config.text.vocab_size, (ROWS, shapes.PROMPT_LEN)).astype(np.int32)
  mask = np.ones_like(prompts)
  calls = {}
  for layout in ("in_out", "blocks"):
    for new in (shapes.NEW_TOKENS, 1):
      sampler = Sampler(model, max_new_tokens=new, eos_ids=(), pad_id=0,
                        prompt_buckets=(shapes.PROMPT_LEN,), weight_layout=layout)
      calls[layout, new] = functools.partial(sampler, prompts, mask, key=jax.random.key(0),
                                             temperature=0.0)
  seconds = _alternate(calls, repeats)
  return {layout: round(1e3 * (seconds[layout, shapes.NEW_TOKENS] - seconds[layout, 1])
                        / (shapes.NEW_TOKENS - 1), 3) for layout in ("in_out", "blocks")}


def main(argv):
  del argv
  peak_rates = peak.matmul_peak_gflops()
  peak_gflops = max(peak_rates.values())
  out = dict(
      host=dict(python=platform.python_version(), platform=platform.platform(),
                jax=jax.__version__, nproc=os.cpu_count(),
                xla_flags=os.environ.get("XLA_FLAGS", "")),
      peak_gflops=peak_gflops,
      read_gb_per_s=read_rates([4, 16, 256]),
      results={size: bench_size(size, peak_gflops, _ROUNDS.value) for size in _SIZES.value})
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  print(json.dumps(out["read_gb_per_s"]))
  for size, r in out["results"].items():
    print(size, json.dumps({k: r[k] for k in ("weight_matmuls", "attention_us_per_step",
                                              "op_us", "sampler_decode_step_ms")}))


if __name__ == "__main__":
  app.run(main)
