r"""SFT train-step throughput (tokens/s) of a text-only Qwen2 decoder, written as JSON.

The same shapes and workload as the peer baselines (shared/peers: Tunix, transformers):
random float32 weights, batch 8 x 256 tokens, next-token cross-entropy on every token,
AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01), full parameters. The step
is `cpt_jax.train.sft.make_train_step` (loss, grads, non-finite skip, AdamW update;
state donated). Compilation is timed apart (ahead of time), then `--warmup` untimed
runs, then `--repeats` timed runs of `--calls` program calls each; the median is reported.
A call runs `--steps_per_call` steps: with more than one, the trainer's `steps_per_call`
program (a scan over that many batches; here the same batch), which on CPU allocates the
step's temporary buffers once per call rather than once per step. Our process keeps its malloc
heap as the trainer does by default on the CPU (`cpt_jax.host_memory`; --nokeep_host_heap: not),
so those buffers reuse the pages of the call before instead of faulting them in anew; the peers
run with glibc's defaults unless --peers_keep_heap gives them PEERS_HEAP_TUNABLES.

FLOPs per token (PaLM appendix B): 6 * N + 12 * layers * heads * head_dim * seq, with N
the matmul weights (every weight of rank >= 2 but the embedding table, which is a lookup;
the LM head counts; biases and norm scales do not) and the attention term counted over the
full seq x seq scores that the einsum computes. Utilisation = achieved FLOP/s / the matmul
peak, measured in the same job as the best of XLA's float32 2048^3 and 4096^3 matmuls (and
PyTorch's, with --peers: the fastest GEMM either library reaches on this machine), unless
`--peak_gflops` fixes it.

`small_vl` is the multimodal path at equal tokens: the `small` decoder behind a 4-block vision
tower (hidden 256), each sequence one 224x224 image (256 patches -> 64 image tokens) and text
filling the rest of the 256 tokens. Its FLOPs add the vision tower's (6 x matmul weights per
patch + window/full attention scores); `over_text` is its step time over `small`'s.

With `--peers`, the same job runs the peers' training workloads on the text sizes right after
ours (shared/peers: transformers + PyTorch `train`, Tunix `train_step`, each in its own process
from the peers' venv) and reports ours / theirs tokens/s ratios. With `--rounds=N` the whole
comparison (per size: ours, then each peer) runs N times in turn: `ratios` is the median over
rounds of the ratio within a round (`ratios_per_round` lists them), steadier on a noisy shared
machine than one pass per side; `results` and `peers` keep the first round's full result and
every round's tokens/s (`tokens_per_s_rounds`). Compare ratios from one job only.

  python benchmarks/sft_step.py --sizes=small,small_vl,100m --peers --rounds=3 --out=/tmp/sft.json
"""
from __future__ import annotations

import collections
import json
import os
import platform
import resource
import statistics
import subprocess
import time

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np
from flax import nnx

import cpt_jax
from peak import matmul_peak_gflops
from cpt_jax import host_memory, models
from cpt_jax.train import optim, sft

SIZES = {
    "small": dict(vocab=4096, hidden=256, intermediate=704, layers=4, heads=8, kv_heads=2),
    "100m": dict(vocab=32000, hidden=768, intermediate=2048, layers=12, heads=12, kv_heads=2),
}

VL_SIZES = {"small_vl": "small"}  # multimodal size -> its decoder
IMAGE_SIZE = 224

_SIZES = flags.DEFINE_list("sizes", ["small", "small_vl", "100m"],
                           f"Model sizes: {sorted(SIZES) + sorted(VL_SIZES)}.")
_OUT = flags.DEFINE_string("out", "sft_step.json", "JSON file (one object per size).")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step.")
_SEQ = flags.DEFINE_integer("seq", 256, "Tokens per sequence.")
_CALLS = flags.DEFINE_integer("calls", 0, "Step-program calls per timing (0: 2 for small, else 1).")
_STEPS_PER_CALL = flags.DEFINE_integer(
    "steps_per_call", 1, "Steps per program call (the trainer's config.steps_per_call: a scan "
    "over that many batches).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs; the median is reported.")
_PEAK = flags.DEFINE_float("peak_gflops", 0.0,
                           "Peak float32 GFLOP/s of the machine (0: measured in this job).")
_PEERS = flags.DEFINE_bool("peers", False, "Also run the HF and Tunix training benchmarks.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Times the comparison of every size is repeated.")
_KEEP_HEAP = flags.DEFINE_bool(
    "keep_host_heap", True, "Our process keeps its malloc heap (cpt_jax.host_memory.keep_heap), "
    "as the trainer does by default on the CPU.")
_PEERS_KEEP_HEAP = flags.DEFINE_bool(
    "peers_keep_heap", False, "Run the peers with the malloc settings PEERS_HEAP_TUNABLES.")
_PEER_PYTHON = flags.DEFINE_string("peer_python", ".peer-venv/bin/python", "The peers' python.")
_PEER_DIR = flags.DEFINE_string("peer_dir", "../shared/peers", "The peer scripts.")
# What comes nearest to host_memory.keep_heap for a process from its environment: one malloc heap
# for every thread, as JAX's dispatch setting is no environment variable (for our small step it
# is 10-20% slower than keep_heap: the threads contend for the heap's lock).
PEERS_HEAP_TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                       f"glibc.malloc.trim_threshold={2**63}")
# peer -> (script, workload, the result key holding tokens_per_s)
PEERS = {"hf": ("hf_bench.py", "train", "train"),
         "tunix": ("tunix_bench.py", "train_step", "train_plain_nnx_step")}


def model_config(size: str) -> models.ModelConfig:
  s = SIZES[size]
  head_dim = s["hidden"] // s["heads"]
  text = models.TextConfig(
      vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
      num_layers=s["layers"], num_heads=s["heads"], num_kv_heads=s["kv_heads"],
      rope_theta=1_000_000.0, rms_norm_eps=1e-6,
      mrope_section=(head_dim // 2, 0, 0))  # text only: the three position rows are equal
  return models.ModelConfig(text=text, vision=None, tie_word_embeddings=False).validate()


def vl_model_config(size: str) -> models.ModelConfig:
  """The decoder of VL_SIZES[size] behind a 4-block vision tower; special ids at the vocab end."""
  text = model_config(VL_SIZES[size]).text
  head_dim = text.hidden_size // text.num_heads
  unit = head_dim // 16  # M-RoPE sections (t, h, w) in the 2:3:3 ratio of Qwen2.5-VL
  text = models.TextConfig(**{**text.__dict__,
                              "mrope_section": (2 * unit, 3 * unit, 3 * unit)})
  vision = models.VisionConfig(depth=4, hidden_size=256, intermediate_size=704, num_heads=4,
                               out_hidden_size=text.hidden_size, fullatt_block_indexes=(3,))
  v = text.vocab_size
  return models.ModelConfig(text=text, vision=vision, tie_word_embeddings=False,
                            bos_token_id=None, eos_token_id=(v - 1,), image_token_id=v - 2,
                            video_token_id=v - 3, vision_start_token_id=v - 4,
                            vision_end_token_id=v - 5).validate()


def vl_batch(config: models.ModelConfig, rng: np.random.Generator) -> dict:
  """Batch x seq tokens, each row [vision_start, image pads, vision_end, text...]."""
  vc = config.vision
  grid = np.asarray([1, IMAGE_SIZE // vc.patch_size, IMAGE_SIZE // vc.patch_size])
  image_tokens = int(grid.prod()) // vc.spatial_merge_size**2
  n_text = _SEQ.value - image_tokens - 2
  if n_text < 1:
    raise app.UsageError(f"--seq={_SEQ.value} leaves no text after {image_tokens} image tokens")
  row = [config.vision_start_token_id] + [config.image_token_id] * image_tokens + [
      config.vision_end_token_id]
  text = rng.integers(0, config.text.vocab_size - 8, (_BATCH.value, n_text))
  ids = np.concatenate([np.tile(row, (_BATCH.value, 1)), text], axis=1).astype(np.int32)
  grids = np.tile(grid, (_BATCH.value, 1)).astype(np.int32)
  ones = np.ones_like(ids)
  meta = models.prepare_inputs(config, ids, ones, grids)
  pixels = rng.standard_normal((_BATCH.value * int(grid.prod()), vc.patch_dim), np.float32)
  return {"input_ids": ids, "attention_mask": ones, "loss_mask": ones, "pixel_values": pixels,
          "position_ids": meta["position_ids"], "vision_inputs": meta["vision_inputs"]}


def vision_flops_per_sequence(config: models.ModelConfig, params: dict) -> float:
  """6 x (vision matmul weights) per patch + attention scores (12 x depth x hidden x the keys a
  patch sees: its window's patches, or all patches in the full-attention blocks)."""
  vc = config.vision
  patches = (IMAGE_SIZE // vc.patch_size) ** 2
  matmul = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params["visual"])
               if x.ndim >= 2)
  window = min(patches, (vc.window_size // vc.patch_size) ** 2)
  keys = sum(patches if i in vc.fullatt_block_indexes else window for i in range(vc.depth))
  return patches * (6 * matmul + 12 * vc.hidden_size * keys)


def expected_params(size: str) -> int:
  """Closed-form parameter count of an untied Qwen2 decoder (q/k/v biases)."""
  s = SIZES[size]
  d, f, kv = s["hidden"], s["intermediate"], s["kv_heads"] * (s["hidden"] // s["heads"])
  per_layer = (d * d + d) + 2 * (d * kv + kv) + d * d + 3 * d * f + 2 * d
  return 2 * s["vocab"] * d + s["layers"] * per_layer + d


def flops_per_token(size: str, params: dict, seq: int) -> float:
  s = SIZES[size]
  matmul = sum(x.size for p, x in jax.tree_util.tree_leaves_with_path(params)
               if x.ndim >= 2 and "embed_tokens" not in jax.tree_util.keystr(p))
  attention = 12 * s["layers"] * s["hidden"] * seq   # heads * head_dim = hidden
  return 6 * matmul + attention


def optim_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, schedule="constant", warmup_ratio=0.0, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.01, momentum=0.0, grad_clip_norm=None, grad_accum_steps=1, freeze=()))


def measure(size: str, peak: float) -> dict:
  multimodal = size in VL_SIZES
  config = vl_model_config(size) if multimodal else model_config(size)
  t0 = time.perf_counter()
  graphdef, params = nnx.split(models.init_from_config(config, 0), nnx.Param)
  params = nnx.to_pure_dict(params)
  init_s = time.perf_counter() - t0
  n_params = sum(x.size for x in jax.tree.leaves(params))
  opt = optim.make_optimizer(optim_config(), params, total_steps=1_000_000)
  state = optim.create_train_state(params, opt, jax.random.PRNGKey(0))
  del params

  rng = np.random.default_rng(0)
  if multimodal:
    batch = jax.device_put(vl_batch(config, rng))
  else:
    ids = rng.integers(0, config.text.vocab_size, (_BATCH.value, _SEQ.value)).astype(np.int32)
    ones = np.ones_like(ids)
    batch = jax.device_put({"input_ids": ids, "attention_mask": ones, "loss_mask": ones})

  per_call = _STEPS_PER_CALL.value
  if per_call > 1:  # the same batch for every step of a call
    batch = jax.tree.map(lambda x: jax.numpy.stack([x] * per_call), batch)
  t0 = time.perf_counter()
  step = sft.make_train_step(graphdef, opt, steps_per_call=per_call).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  calls = _CALLS.value or (2 if size.startswith("small") else 1)
  steps = calls * per_call

  def call():
    nonlocal state
    for _ in range(calls):
      state, metrics = step(state, batch)
    return float(np.asarray(metrics["loss"]).reshape(-1)[-1])  # waits for the last step

  t0 = time.perf_counter()
  first_loss = call()
  first_call_s = time.perf_counter() - t0
  for _ in range(_WARMUP.value - 1):
    call()
  times = []
  for _ in range(_REPEATS.value):
    t0 = time.perf_counter()
    last_loss = call()
    times.append(time.perf_counter() - t0)
  median = statistics.median(times)
  tokens = _BATCH.value * _SEQ.value * steps
  decoder = VL_SIZES.get(size, size)
  decoder_params = {k: v for k, v in state.params.items() if k != "visual"}
  flops = flops_per_token(decoder, decoder_params, _SEQ.value) * tokens
  if multimodal:
    flops += vision_flops_per_sequence(config, state.params) * _BATCH.value * steps
  return dict(
      library="cpt_jax", workload="sft_train_step", size=size, dtype="float32",
      batch=_BATCH.value, seq_len=_SEQ.value, calls_per_timing=calls, steps_per_call=per_call,
      params=int(n_params), params_expected=None if multimodal else expected_params(size),
      init_s=round(init_s, 3), compile_s=round(compile_s, 3), first_call_s=round(first_call_s, 4),
      warmup_calls=_WARMUP.value, times_s=[round(t, 4) for t in times], median_s=round(median, 4),
      tokens_per_s=round(tokens / median, 2),
      flops_per_token=flops / tokens, gflops_per_s=round(flops / median / 1e9, 2),
      peak_gflops=peak, fraction_of_peak=round(flops / median / 1e9 / peak, 4),
      loss_first=first_loss, loss_last=last_loss,
      skipped=int(state.skipped),
      peak_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      jax=jax.__version__, backend=jax.default_backend(), devices=jax.device_count(),
      cpu=platform.processor() or platform.machine())


def run_peer(peer: str, size: str) -> dict:
  script, workload, _ = PEERS[peer]
  command = [_PEER_PYTHON.value, os.path.join(_PEER_DIR.value, script), "--size", size,
             "--workload", workload]
  load = os.getloadavg()[0]
  # The peers run without the XLA flags cpt_jax sets for itself.
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace(
      cpt_jax.XLA_CPU_FLAGS, "").strip()}
  if _PEERS_KEEP_HEAP.value:
    env["GLIBC_TUNABLES"] = PEERS_HEAP_TUNABLES
  proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not lines:
    return dict(command=" ".join(command), error=proc.stderr[-2000:])
  return dict(json.loads(lines[-1]), load_1min_before=load)


def _keep(table: dict, name: str, result: dict, tokens_per_s: float | None) -> None:
  """The first round's whole result, and every round's tokens/s beside it."""
  entry = table.setdefault(name, result)
  entry.setdefault("tokens_per_s_rounds", []).append(tokens_per_s)


def main(argv):
  del argv
  unknown = [s for s in _SIZES.value if s not in SIZES and s not in VL_SIZES]
  if unknown:
    raise app.UsageError(f"unknown sizes {unknown}; known: {sorted(SIZES) + sorted(VL_SIZES)}")
  if _ROUNDS.value < 1:
    raise app.UsageError(f"--rounds must be >= 1, got {_ROUNDS.value}")
  heap_kept = _KEEP_HEAP.value and host_memory.keep_heap()  # before the backend starts
  peaks = matmul_peak_gflops(_PEER_PYTHON.value if _PEERS.value else None)
  peak = _PEAK.value or max(peaks.values())
  print(json.dumps({"matmul_gflops": peaks, "peak_gflops": peak}), flush=True)
  results, peers, per_round = {}, {}, collections.defaultdict(list)
  for round_index in range(_ROUNDS.value):
    this_round = {}
    for size in _SIZES.value:
      ours = this_round[size] = measure(size, peak)
      text = this_round.get(VL_SIZES.get(size))
      if text is not None:
        ours["over_text"] = round(ours["median_s"] / text["median_s"], 3)
      _keep(results, size, ours, ours["tokens_per_s"])
      print(json.dumps(ours), flush=True)
      for peer in PEERS if _PEERS.value and size in SIZES else ():
        result = run_peer(peer, size)
        theirs = result.get("results", {}).get(PEERS[peer][2], {}).get("tokens_per_s")
        if theirs:
          per_round[f"{size}_vs_{peer}"].append(round(ours["tokens_per_s"] / theirs, 3))
          result["fraction_of_peak"] = round(theirs * ours["flops_per_token"] / 1e9 / peak, 4)
        _keep(peers, f"{peer}_{size}", result, theirs)
      if _PEERS.value and size in SIZES:
        print(json.dumps({k: v for k, v in per_round.items() if k.startswith(f"{size}_")}),
              flush=True)
    # Written after every round: a crash late in a long job keeps the rounds already done.
    report = dict(matmul_gflops=peaks, peak_gflops=peak, rounds=round_index + 1,
                  host_heap_kept=heap_kept, peers_keep_heap=_PEERS_KEEP_HEAP.value,
                  results=list(results.values()), load_1min_end=os.getloadavg()[0])
    if _PEERS.value:
      report["peers"] = peers
      report["ratios"] = {k: round(statistics.median(v), 3) for k, v in per_round.items()}
      report["ratios_per_round"] = dict(per_round)
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=2)
  if _PEERS.value:
    print(json.dumps({"ratios": report["ratios"]}), flush=True)


if __name__ == "__main__":
  app.run(main)
