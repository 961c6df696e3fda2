r"""Rollout throughput of cpt_jax.rl.sampler.Sampler (tokens/s), written as JSON.

Workload of the peer baselines (../shared/peers): text-only Qwen2 decoders with random float32
weights, batch 8, prompt 64 random tokens, exactly 64 new tokens (no EOS), greedy and plain
sampling (temperature 1, no top-k / top-p). tokens/s = 8 * 64 / wall time of one generate call
(prefill + decode + transfer of the results to the host), median of the timed calls after the
warm-up (whose compile time is reported apart). Also: the prefill cost of a prompt holding an
image (a small Qwen2.5-VL) against a text-only prompt of the same length, the memory bandwidth
of this machine with the weight bytes a decode step reads, and the compute bound: the FLOPs of
a whole call (prefill + decode steps) at the float32 matmul peak measured in the same job
(`peak.py`; with --peers PyTorch's GEMM counts too), and each mode's fraction of it; and greedy
rollouts of the paper's longest response (--long_new_tokens, ours only: the peer harness is
fixed at 64 new tokens), where attention over the long KV cache weighs more.

Our process has one XLA CPU device per core (--host_devices), and our sampler is timed in three
layouts: on one device with the column-block matmul kernel (the CPU default,
`cpt_jax.kernels.blocked_matmul`), on one device with XLA's dots, and data-parallel over all
devices (a {'data': n} mesh, weights replicated, batch split, XLA's dots; `layouts`). The
fastest layout is the one compared with the peers (`layout`); all are recorded.

  python benchmarks/sampler.py --out=/tmp/sampler.json
  python benchmarks/sampler.py --sizes=small --peers --out=/tmp/sampler.json   # + Tunix, HF

Peers (--peers) run in their own processes from the peer venv, after ours in the same job.
With --rounds=N the whole comparison (ours, then each peer, per size) runs N times in turn:
`ratios` is the median over rounds of ours / theirs within a round (`ratios_per_round` lists
them), which on a noisy shared machine is steadier than one pass per side (two back-to-back
one-pass jobs here disagreed by 1.6x). Read them next to the 1-minute load averages recorded.
"""
from __future__ import annotations

import collections
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cpt_jax
from peak import matmul_peak_gflops
from shapes import BATCH, NEW_TOKENS, PROMPT_LEN, text_config
from cpt_jax import sharding
from cpt_jax.models import ModelConfig, TextConfig, VisionConfig, init_from_config
from cpt_jax.rl.sampler import Sampler

_OUT = flags.DEFINE_string("out", "sampler_bench.json", "Where to write the JSON results.")
_SIZES = flags.DEFINE_list("sizes", ["small", "100m"], "Model sizes to measure.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed generate calls (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls first (the first one compiles).")
_MULTIMODAL = flags.DEFINE_bool("multimodal", True, "Measure image vs text prefill.")
_PEERS = flags.DEFINE_bool("peers", False, "Also run the Tunix and HF peer generate benchmarks.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Times the comparison of every size is repeated.")
_LONG = flags.DEFINE_integer(
    "long_new_tokens", 1024, "Also time greedy rollouts of this many new tokens on the small "
    "size (the paper's longest response; 0 skips): decode attention over a long cache.")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", os.cpu_count() or 1, "XLA CPU devices of our process (`jax_num_cpu_devices`; "
    "default one per core). Above 1 (dividing the batch of 8), our sampler is also timed "
    "data-parallel over them, and the faster of the two layouts is compared with the peers.")
_PEER_PYTHON = flags.DEFINE_string("peer_python", ".peer-venv/bin/python", "The peers' python.")
_PEER_DIR = flags.DEFINE_string("peer_dir", "../shared/peers", "The peer scripts.")
# Extra XLA:CPU flags for our process only (the peers run with the environment they were given).
# Default: none, what a user gets (training programs' dots on Eigen, the Sampler's on YNNPACK
# through its per-program compiler options: cpt_jax.rl.sampler.default_compiler_options).
_XLA_CPU_FLAGS = flags.DEFINE_string(
    "xla_cpu_flags", "", "Appended to XLA_FLAGS before the backend starts.")

MODES = {"greedy": dict(temperature=0.0), "sample": dict(temperature=1.0)}

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
_compile = collections.Counter()


def _listen(event: str, duration: float, **_) -> None:
  if event in COMPILE_EVENTS:
    _compile["seconds"] += duration
    if event == COMPILE_EVENTS[-1]:
      _compile["count"] += 1


jax.monitoring.register_event_duration_secs_listener(_listen)


def _load() -> float:
  return round(os.getloadavg()[0], 2)


def _timed(call, warmup: int, repeats: int) -> dict:
  """First-call and compile time of the warm-up, then the timed calls (median)."""
  before = dict(_compile)
  warm = []
  for _ in range(max(1, warmup)):
    start = time.perf_counter()
    call()
    warm.append(time.perf_counter() - start)
  compiled = dict(_compile)
  times, loads = [], []
  for _ in range(repeats):
    loads.append(_load())
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return dict(
      first_call_s=round(warm[0], 4),
      compile_s=round(compiled.get("seconds", 0) - before.get("seconds", 0), 4),
      compilations_during_timed=_compile["count"] - compiled.get("count", 0),
      times_s=[round(t, 4) for t in times], median_s=round(statistics.median(times), 4),
      min_s=round(min(times), 4), load_1min=loads)


def _layer_weights(config: ModelConfig) -> tuple[int, int]:
  """(matmul weights, biases + norm scales) of one decoder layer."""
  t = config.text
  d, f, kv = t.hidden_size, t.intermediate_size, t.num_kv_heads * t.head_dim
  return d * (d + 2 * kv) + d * d + 3 * d * f, (d + 2 * kv) + 2 * d


def _weight_bytes_per_decode_step(config: ModelConfig) -> int:
  """Bytes of float32 weights one decode step reads: every layer, the final norm and lm_head
  (the embedding is gathered, one row per token)."""
  t = config.text
  d = t.hidden_size
  return 4 * (t.num_layers * sum(_layer_weights(config)) + d + d * t.vocab_size)


def flops_per_call(config: ModelConfig) -> float:
  """Matmul and attention FLOPs of one generate call: the prefill of BATCH x PROMPT_LEN tokens
  (LM head on each row's last token only), then NEW_TOKENS - 1 decode steps of BATCH tokens;
  every query's attention runs over all PROMPT_LEN + NEW_TOKENS - 1 cache slots."""
  t = config.text
  layers = 2 * t.num_layers * _layer_weights(config)[0]  # per token
  head = 2 * t.hidden_size * t.vocab_size
  attention = 4 * t.num_layers * t.num_heads * t.head_dim * (PROMPT_LEN + NEW_TOKENS - 1)
  prefill = BATCH * PROMPT_LEN * (layers + attention) + BATCH * head
  return prefill + (NEW_TOKENS - 1) * BATCH * (layers + attention + head)


def memory_bandwidth_gbps(megabytes: int = 512, repeats: int = 5) -> float:
  """Best read bandwidth of a jitted float32 sum over a buffer larger than any cache."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    total(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return round(x.nbytes / best / 1e9, 2)


def layouts() -> tuple[str, ...]:
  """'one_device' (the first CPU device; the column-block kernel where it builds, the CPU
  default), 'one_device_xla_dots' (the same on XLA's dots: weight_layout 'in_out'), and
  'data_parallel' (the batch split over every device, the weights replicated, XLA's dots)
  when there are several and they divide the batch."""
  count = jax.device_count()
  return ("one_device", "one_device_xla_dots") + (
      ("data_parallel",) if count > 1 and BATCH % count == 0 else ())


def _placed(config: ModelConfig, layout: str) -> tuple[nnx.Module, dict]:
  """A fresh model in `layout`, and the Sampler arguments that go with it."""
  model = init_from_config(config, 0)
  if layout == "one_device":
    return model, {}
  if layout == "one_device_xla_dots":
    return model, dict(weight_layout="in_out")
  mesh = sharding.make_mesh({"data": -1})
  return sharding.shard_model(model, mesh, "data"), dict(mesh=mesh, rules="data")


def bench_generate(size: str) -> dict:
  """Generate calls of each layout in turn; the faster layout's numbers (mean of greedy and
  sampling) head the result, every layout's are under 'layouts'."""
  config = text_config(size)
  start = time.perf_counter()
  model = init_from_config(config, 0)
  jax.block_until_ready(jax.tree.leaves(model))
  out = dict(size=size, init_s=round(time.perf_counter() - start, 3),
             params=sum(x.size for x in jax.tree.leaves(model)),
             weight_bytes_per_decode_step=_weight_bytes_per_decode_step(config))
  del model
  out["layouts"] = {layout: _bench_layout(config, layout) for layout in layouts()}
  rate = lambda r: sum(r[f"generate_{mode}"]["tokens_per_s"] for mode in MODES)
  out["layout"] = max(out["layouts"], key=lambda layout: rate(out["layouts"][layout]))
  return out | out["layouts"][out["layout"]]


def _bench_layout(config: ModelConfig, layout: str) -> dict:
  model, placement = _placed(config, layout)
  sampler = Sampler(model, max_new_tokens=NEW_TOKENS, eos_ids=(), pad_id=0,
                    prompt_buckets=(PROMPT_LEN,), **placement)
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, config.text.vocab_size, (BATCH, PROMPT_LEN)).astype(np.int32)
  mask = np.ones_like(prompts)
  out = dict(devices=1 if sampler.mesh is None else sampler.mesh.size,
             weight_layout=sampler.weight_layout)
  for mode, kwargs in MODES.items():
    calls, lengths = [0], set()

    def call():
      calls[0] += 1
      result = sampler(prompts, mask, key=jax.random.key(calls[0]), **kwargs)
      lengths.update(result.lengths.tolist())

    r = _timed(call, _WARMUP.value, _REPEATS.value)
    r["tokens_per_s"] = round(BATCH * NEW_TOKENS / r["median_s"], 2)
    r["new_tokens_per_row_seen"] = sorted(lengths)
    out[f"generate_{mode}"] = r
  # Where the time goes: the same call with one new token is prefill + first token alone.
  prefill = Sampler(model, max_new_tokens=1, eos_ids=(), pad_id=0, prompt_buckets=(PROMPT_LEN,),
                    **placement)
  r = _timed(lambda: prefill(prompts, mask, key=jax.random.key(0), temperature=0.0),
             _WARMUP.value, _REPEATS.value)
  decode_s = (out["generate_greedy"]["median_s"] - r["median_s"]) / (NEW_TOKENS - 1)
  out["prefill_greedy"] = r
  out["decode_step_ms_greedy"] = round(1e3 * decode_s, 2)
  return out


def bench_long_response(new_tokens: int, size: str = "small", repeats: int = 3) -> dict:
  """Greedy rollouts of `new_tokens` tokens (no EOS) after the usual 64-token prompts: the later
  decode steps attend over a cache of up to PROMPT_LEN + new_tokens - 1 slots. The Sampler's
  default cache, which grows in steps (`cache_rooms`), against one cache sized for the whole
  response (cache_growth=None), their calls taken in turn."""
  config = text_config(size)
  model = init_from_config(config, 0)
  samplers = {name: Sampler(model, max_new_tokens=new_tokens, eos_ids=(), pad_id=0,
                            prompt_buckets=(PROMPT_LEN,), **kw)
              for name, kw in (("growing_cache", {}), ("one_cache", dict(cache_growth=None)))}
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, config.text.vocab_size, (BATCH, PROMPT_LEN)).astype(np.int32)
  calls = {name: (lambda s=s: s(prompts, np.ones_like(prompts), key=jax.random.key(0),
                                temperature=0.0))
           for name, s in samplers.items()}
  out = dict(size=size, batch=BATCH, prompt_len=PROMPT_LEN, new_tokens=new_tokens,
             cache_rooms=samplers["growing_cache"].cache_rooms)
  for name, call in calls.items():  # the first call compiles
    compiled, start = _compile["seconds"], time.perf_counter()
    call()
    out[name] = dict(first_call_s=round(time.perf_counter() - start, 4),
                     compile_s=round(_compile["seconds"] - compiled, 4), times_s=[])
  for _ in range(repeats):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      out[name]["times_s"].append(round(time.perf_counter() - start, 4))
  for name in calls:
    median = statistics.median(out[name]["times_s"])
    out[name].update(median_s=round(median, 4), tokens_per_s=round(BATCH * new_tokens / median, 2))
  out["growing_over_one_cache"] = round(
      out["growing_cache"]["tokens_per_s"] / out["one_cache"]["tokens_per_s"], 3)
  return out


def _vision_config() -> ModelConfig:
  """The `small` decoder with a 4-block vision tower (hidden 256) in front."""
  base = text_config("small")
  text = TextConfig(**{**base.text.__dict__, "mrope_section": (4, 6, 6)})
  vision = VisionConfig(depth=4, hidden_size=256, intermediate_size=704, num_heads=4,
                        out_hidden_size=text.hidden_size, fullatt_block_indexes=(3,))
  v = text.vocab_size
  return ModelConfig(text=text, vision=vision, tie_word_embeddings=False, bos_token_id=None,
                     eos_token_id=(v - 1,), image_token_id=v - 2, video_token_id=v - 3,
                     vision_start_token_id=v - 4, vision_end_token_id=v - 5).validate()


def bench_multimodal_prefill(image_size: int = 224, text_tokens: int = 32) -> dict:
  """Prefill (+ the first sampled token) of a batch of 8 prompts, each one 224x224 image and
  32 text tokens, against 8 text-only prompts of the same length."""
  config = _vision_config()
  model = init_from_config(config, 0)
  patch = config.vision.patch_size
  grid = (1, image_size // patch, image_size // patch)
  image_tokens = grid[1] * grid[2] // config.vision.spatial_merge_size**2
  rng = np.random.default_rng(0)
  text = rng.integers(1, config.text.vocab_size - 8, (BATCH, text_tokens)).astype(np.int32)
  image_row = [config.vision_start_token_id] + [config.image_token_id] * image_tokens + [
      config.vision_end_token_id]
  with_image = np.concatenate([np.tile(image_row, (BATCH, 1)), text], axis=1).astype(np.int32)
  length = with_image.shape[1]
  text_only = rng.integers(1, config.text.vocab_size - 8, (BATCH, length)).astype(np.int32)
  pixels = rng.standard_normal((BATCH * grid[1] * grid[2], config.vision.patch_dim),
                               dtype=np.float32)
  grids = np.tile(np.asarray(grid), (BATCH, 1))
  sampler = Sampler(model, max_new_tokens=1, eos_ids=(), pad_id=0, prompt_buckets=(length,))
  key = jax.random.key(0)
  runs = {
      "text_only": lambda: sampler(text_only, np.ones_like(text_only), key=key, temperature=0),
      "with_image": lambda: sampler(with_image, np.ones_like(with_image), key=key, temperature=0,
                                    pixel_values=pixels, image_grid_thw=grids),
  }
  out = dict(batch=BATCH, prompt_tokens=length, image_size=image_size, image_tokens=image_tokens,
             patches_per_image=grid[1] * grid[2],
             vision=dict(depth=config.vision.depth, hidden=config.vision.hidden_size))
  for name, call in runs.items():
    out[name] = _timed(call, _WARMUP.value, _REPEATS.value)
  out["image_over_text"] = round(out["with_image"]["median_s"] / out["text_only"]["median_s"], 2)
  return out


def run_peer(script: str, size: str, env: dict) -> dict:
  command = [_PEER_PYTHON.value, os.path.join(_PEER_DIR.value, script), "--size", size,
             "--workload", "generate"]
  load = _load()
  proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    return dict(command=" ".join(command), error=proc.stderr[-2000:])
  result = json.loads(lines[-1])
  result["load_1min_before"] = load
  return result


def _keep(table: dict, name: str, result: dict, round_index: int) -> None:
  """The first round's whole result, and every round's tokens/s per mode beside it."""
  entry = table.setdefault(name, result)
  rates = (result.get("results", result).get(f"generate_{m}", {}).get("tokens_per_s")
           for m in MODES)
  for mode, rate in zip(MODES, rates):
    entry.setdefault(f"tokens_per_s_rounds_{mode}", []).append(rate)
  for layout, r in result.get("layouts", {}).items():
    for mode in MODES:
      entry.setdefault(f"tokens_per_s_rounds_{layout}_{mode}", []).append(
          r[f"generate_{mode}"]["tokens_per_s"])
  entry["rounds"] = round_index + 1


def main(argv) -> None:
  del argv
  # The peers run without the XLA flags cpt_jax sets for itself.
  peer_env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace(
      cpt_jax.XLA_CPU_FLAGS, "").strip()}
  # XLA reads XLA_FLAGS when the CPU backend starts, at the first computation below.
  os.environ["XLA_FLAGS"] = " ".join(
      f for f in (os.environ.get("XLA_FLAGS", ""), _XLA_CPU_FLAGS.value) if f)
  jax.config.update("jax_num_cpu_devices", _HOST_DEVICES.value)
  report = dict(host=dict(python=sys.version.split()[0], platform=platform.platform(),
                          jax=jax.__version__, nproc=os.cpu_count(),
                          cpu_devices=jax.device_count(),
                          xla_flags=os.environ.get("XLA_FLAGS", "")),
                workload=dict(batch=BATCH, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS,
                              dtype="float32"),
                load_1min_start=_load(), memory_bandwidth_gbps=memory_bandwidth_gbps(),
                matmul_gflops=matmul_peak_gflops(_PEER_PYTHON.value if _PEERS.value else None))
  report["peak_gflops"] = max(report["matmul_gflops"].values())
  report["results"], report["peers"], per_round = {}, {}, collections.defaultdict(list)
  for round_index in range(_ROUNDS.value):
    for size in _SIZES.value:
      result = bench_generate(size)
      # What reading every decode-step weight once at the measured bandwidth would allow.
      step_s = result["weight_bytes_per_decode_step"] / (report["memory_bandwidth_gbps"] * 1e9)
      result["weight_read_bound_tokens_per_s"] = round(BATCH / step_s, 1)
      # What the FLOPs of a whole call at the matmul peak would allow, and how close each mode is.
      flops = flops_per_call(text_config(size))
      result["flops_per_call"] = flops
      result["compute_bound_tokens_per_s"] = round(
          BATCH * NEW_TOKENS * report["peak_gflops"] * 1e9 / flops, 1)
      for layout, mode in itertools.product(result["layouts"].values(), MODES):
        layout[f"generate_{mode}"]["fraction_of_peak"] = round(
            layout[f"generate_{mode}"]["tokens_per_s"] / result["compute_bound_tokens_per_s"], 4)
      _keep(report["results"], size, result, round_index)
      print(json.dumps({size: {layout: {m: r[f"generate_{m}"]["tokens_per_s"] for m in MODES}
                              for layout, r in result["layouts"].items()}}), flush=True)
      for script in ("tunix_bench.py", "hf_bench.py") if _PEERS.value else ():
        peer = script.split("_")[0]
        theirs = run_peer(script, size, peer_env)
        _keep(report["peers"], f"{peer}_{size}", theirs, round_index)
        for mode in MODES:
          their_rate = theirs.get("results", {}).get(f"generate_{mode}", {}).get("tokens_per_s")
          if their_rate:
            per_round[f"{size}_{mode}_vs_{peer}"].append(
                round(result[f"generate_{mode}"]["tokens_per_s"] / their_rate, 3))
        print(json.dumps({k: v for k, v in per_round.items() if k.startswith(size)}), flush=True)
  if _LONG.value:
    report["long_response"] = bench_long_response(_LONG.value)
  if _MULTIMODAL.value:
    report["multimodal_prefill"] = bench_multimodal_prefill()
  if _PEERS.value:
    report["ratios"] = {k: round(statistics.median(v), 2) for k, v in per_round.items()}
    report["ratios_per_round"] = dict(per_round)
  report["load_1min_end"] = _load()
  with open(_OUT.value, "w") as f:
    json.dump(report, f, indent=1)
  print(json.dumps({k: report[k] for k in ("memory_bandwidth_gbps", "peak_gflops",
                                           "load_1min_start", "load_1min_end")}
                   | {"ratios": report.get("ratios")}))


if __name__ == "__main__":
  app.run(main)
