r"""Breakdown of one GRPO RFT iteration (rollout, grading, pi_old, reference, update), as JSON.

One iteration = sample n responses for each prompt of a rollout batch, grade them, score
pi_old and pi_ref, then the optimiser steps over update batches (`train.rft.GRPOTrainer`).
Compilation happens in an untimed first iteration (its seconds are reported apart).

  python benchmarks/rft_step.py --size=small --out=/tmp/rft_step.json
  python benchmarks/rft_step.py --size=tiny_vl   # the tiny multimodal model of the tests
  python benchmarks/rft_step.py --layout=data_parallel   # one XLA CPU device per core

Sizes: `small` and `100m` are the text-only Qwen2 shapes of the peer benchmarks
(../shared/peers: vocab 4096 / hidden 256 / 4 layers, and vocab 32000 / hidden 768 /
12 layers); `tiny_vl` is `ModelConfig.tiny` with one 56x56 image (4 image tokens) per prompt.
Prompts are random tokens; rewards come from grading the decoded token ids against random
answers with the paper's reward, so that grading costs what it costs, and the groups are given
random 0/1 accuracies so that advantages are non-zero (the update cost does not depend on
their values). Float32, AdamW, KL on (low_var_kl), recompute pi_old. The malloc heap is kept
as the trainer keeps it by default on the CPU (`cpt_jax.host_memory`; --nokeep_host_heap: not).
"""
from __future__ import annotations

import json
import os
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

import cpt_jax  # noqa: F401  (flax eager sharding off)
from cpt_jax import host_memory, sharding
from cpt_jax.models import ModelConfig, TextConfig, init_from_config
from cpt_jax.rl import grpo, rewards, rollout
from cpt_jax.rl.sampler import Sampler
from cpt_jax.train import optim, rft
from shapes import SIZES

_OUT = flags.DEFINE_string("out", "rft_step.json", "Where to write the JSON results.")
_SIZE = flags.DEFINE_enum("size", "small", ["small", "100m", "tiny_vl"], "Model shape.")
_PROMPTS = flags.DEFINE_integer("rollout_batch", 16, "Prompts per rollout batch.")
_UPDATE = flags.DEFINE_integer("update_batch", 8, "Prompts per optimiser step.")
_N = flags.DEFINE_integer("n", 8, "Responses per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Response tokens (no EOS: always all of them).")
_LAYOUT = flags.DEFINE_enum(
    "layout", "one_device", ["one_device", "data_parallel"],
    "data_parallel: one XLA CPU device per core, the batch split over them, weights replicated "
    "(what the README recommends for rollouts of small models on a CPU host).")
_WEIGHT_LAYOUT = flags.DEFINE_enum(
    "weight_layout", "auto", ["auto", "in_out", "out_in", "blocks"],
    "The sampler's weight_layout ('auto': the column-block kernel on one CPU device).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed iterations.")
_KEEP_HEAP = flags.DEFINE_bool(
    "keep_host_heap", True, "Keep the malloc heap (cpt_jax.host_memory.keep_heap), as the "
    "trainer does by default on the CPU.")


def _model_config(size: str) -> ModelConfig:
  if size == "tiny_vl":
    return ModelConfig.tiny(vocab_size=512)
  text = TextConfig(**SIZES[size], rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
                    mrope_section=(4, 6, 6) if size == "small" else (8, 12, 12))
  vocab = SIZES[size]["vocab_size"]
  return ModelConfig(text=text, vision=None, bos_token_id=None, eos_token_id=(vocab - 1,),
                     pad_token_id=0, image_token_id=vocab - 2, video_token_id=vocab - 3,
                     vision_start_token_id=vocab - 4, vision_end_token_id=vocab - 5)


def _prompt_batch(config: ModelConfig, rng: np.random.Generator, batch: int, length: int) -> dict:
  ids = rng.integers(1, 256, (batch, length)).astype(np.int32)
  out = dict(prompt_ids=ids, prompt_mask=np.ones_like(ids), answer=np.array(["4"] * batch),
             task=np.array(["superclevr"] * batch), id=np.arange(batch).astype(str))
  if config.vision is not None:
    ids[:, 1] = config.vision_start_token_id
    ids[:, 2:6] = config.image_token_id
    ids[:, 6] = config.vision_end_token_id
    out["pixel_values"] = rng.normal(size=(batch * 16, config.vision.patch_dim)).astype(np.float32)
    out["image_grid_thw"] = np.tile(np.array([[1, 4, 4]], np.int32), (batch, 1))
  return out


class _Tokens:
  """Decodes token ids as text (no tokenizer of this size exists offline)."""

  def batch_decode(self, rows, skip_special_tokens=True):
    del skip_special_tokens
    return [" ".join(map(str, r)) for r in rows]


def main(argv) -> None:
  del argv
  heap_kept = _KEEP_HEAP.value and host_memory.keep_heap()  # before the backend starts
  mesh = rules = None
  if _LAYOUT.value == "data_parallel":
    jax.config.update("jax_num_cpu_devices", os.cpu_count())  # before the backend starts
    mesh, rules = sharding.make_mesh({"data": -1}), "data"
  config = _model_config(_SIZE.value)
  cfg = grpo.GRPOConfig(n=_N.value, rollout_batch_size=_PROMPTS.value,
                        update_batch_size=_UPDATE.value, max_response_length=_NEW.value,
                        reward="no_cot")
  model = init_from_config(config, 0)
  if mesh is not None:
    model = sharding.shard_model(model, mesh, rules)
  graphdef, params, _ = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  optim_config = ConfigDict(dict(name="adamw", lr=1e-6, schedule="constant", warmup_ratio=0.0,
                                 b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, momentum=0.0,
                                 grad_clip_norm=1.0, grad_accum_steps=1, freeze=()))
  optimizer = optim.make_optimizer(optim_config, params, total_steps=1000)
  # No EOS id is ever sampled-and-stopped on: every response has exactly new_tokens tokens.
  sampler = Sampler(model, max_new_tokens=_NEW.value, eos_ids=(), pad_id=0,
                    prompt_buckets=(_PROMPT_LEN.value,), mesh=mesh, rules=rules,
                    weight_layout=_WEIGHT_LAYOUT.value)
  state = optim.create_train_state(params, optimizer, jax.random.PRNGKey(0))
  state_sharding = None
  if mesh is not None:
    state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
  trainer = rft.GRPOTrainer(graphdef, optimizer, cfg, config,
                            reference_params=jax.tree.map(jnp.copy, params), sampler=sampler,
                            mesh=mesh, rules=rules, state_sharding=state_sharding)
  rng = np.random.default_rng(0)

  def iteration(i: int) -> dict[str, float]:
    nonlocal state
    batch = _prompt_batch(config, rng, _PROMPTS.value, _PROMPT_LEN.value)
    t0 = time.perf_counter()
    groups = rollout.sample_groups(sampler, batch, key=jax.random.key(i), cfg=cfg,
                                   tokenizer=_Tokens())
    t1 = time.perf_counter()
    groups["reward"] = rng.integers(0, 2, groups["reward"].shape).astype(np.float32)
    groups = rollout.add_advantages(groups, cfg)
    state, metrics = trainer.update(state, groups)
    t2 = time.perf_counter()
    trainer.sync_rollout(state.params)
    t3 = time.perf_counter()
    return {"rollout_s": t1 - t0, "old_logprobs_s": metrics["time/old_logprobs"],
            "reference_s": metrics["time/reference"], "update_s": metrics["time/update"],
            "host_prep_s": (t2 - t1) - metrics["time/old_logprobs"] - metrics["time/reference"]
            - metrics["time/update"], "sync_s": t3 - t2, "iteration_s": t3 - t0}

  # Grading alone (host): the rollout time above includes it.
  responses = [" ".join(map(str, rng.integers(0, 4096, _NEW.value)))
               for _ in range(_PROMPTS.value * _N.value)]
  t = time.perf_counter()
  rewards.score_batch(responses, ["4"] * len(responses), "superclevr", "cot_boxed")
  grading_s = time.perf_counter() - t

  first = iteration(0)
  timed = [iteration(i + 1) for i in range(_REPEATS.value)]
  median = {k: float(np.median([t[k] for t in timed])) for k in timed[0]}
  rows = _PROMPTS.value * _N.value
  result = {
      "benchmark": "rft_step", "size": _SIZE.value, "layout": _LAYOUT.value,
      "weight_layout": sampler.weight_layout,
      "backend": jax.default_backend(),
      "devices": jax.device_count(), "machine": platform.machine(), "cpus": os.cpu_count(),
      "params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
      "rollout_batch": _PROMPTS.value, "n": _N.value, "update_batch": _UPDATE.value,
      "optimizer_steps": _PROMPTS.value // _UPDATE.value, "prompt_len": _PROMPT_LEN.value,
      "new_tokens": _NEW.value, "first_iteration_s (compiles)": first["iteration_s"],
      **median,
      "rollout_tokens_per_s": rows * _NEW.value / median["rollout_s"],
      "update_tokens_per_s": rows * (_PROMPT_LEN.value + _NEW.value) / median["update_s"],
      "grading_s": grading_s, "repeats": _REPEATS.value, "host_heap_kept": heap_kept,
  }
  print(json.dumps(result, indent=2))
  with open(_OUT.value, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
