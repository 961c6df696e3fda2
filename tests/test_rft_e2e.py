"""RFT end to end: the SFT job, then the RFT job (with offline RIF-RFT) from its workdir, on a
synthetic task; plus RIF-RFT's offline and online filters on constructed cases.

The tiny model is first fine-tuned briefly on pathvqa (SFT job) so that it answers in the task's
format and gets some answers right; the RFT job then starts from that workdir (weights and
tokenizer), filters the training set offline with 8 rollouts per instance, and runs GRPO.
The vision tower is frozen in both jobs: it halves compilation, and the step's gradient through
the vision tower is checked in test_rft_step.py.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from cpt_jax import writer
from cpt_jax.models import ModelConfig
from cpt_jax.rl import rollout
from cpt_jax.train import loop, rft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = dict(train_size=256, test_size=128, image_size=56, seed=0)
ITERATIONS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  sys.path.insert(0, ROOT)  # the configs/ package lives beside the tests
  try:
    from configs import rft_synthetic, sft_synthetic  # noqa: PLC0415
  finally:
    sys.path.remove(ROOT)
  root = tmp_path_factory.mktemp("rft_e2e")
  data_dir = str(root / "data")
  sft = sft_synthetic.get_config("task=pathvqa")
  sft.data.dir = data_dir
  sft.data.synthetic = SYNTHETIC
  sft.tokenizer.vocab_size = 320
  sft.total_steps = 40
  sft.data.batch_size = 16
  sft.data.length_buckets = (96,)  # pathvqa examples: 80-90 tokens
  sft.eval.every = -1  # no SFT evaluation: the RFT job measures its starting point
  sft.ckpt.every = 1000
  sft.log_every = 1000
  sft.optim.freeze = ("visual",)
  loop.run(sft, str(root / "sft"))

  config = rft_synthetic.get_config(f"task=pathvqa,init={root / 'sft'},rif=offline")
  config.data.dir = data_dir
  config.data.synthetic = SYNTHETIC
  # 16 prompts x 8 responses per iteration, 2 optimiser steps of 8 prompts.
  config.rl.update(n=8, rollout_batch_size=16, update_batch_size=8, eval_temperature=1.0)
  config.optim.lr = 2e-3
  config.optim.freeze = ("visual",)
  config.num_iterations = ITERATIONS
  # Test accuracy at the training temperature, 8 answers for each of 128 prompts: batches shaped
  # like a rollout batch reuse the compiled sampler.
  config.eval.update(at_start=True, batch_size=16, num_samples=8, max_examples=128)
  config.ckpt.every = 1000
  workdir = str(root / "rft")
  final = rft.run(config, workdir)
  return dict(final=final, workdir=workdir, metrics=writer.read_metrics(workdir))


def test_rft_raises_reward_and_test_accuracy(runs):
  train = [m for m in runs["metrics"] if "reward_mean" in m]
  assert len(train) == ITERATIONS
  first = np.mean([m["reward_mean"] for m in train[:3]])
  last = np.mean([m["reward_mean"] for m in train[-3:]])
  start = runs["final"]["eval/all/accuracy_start"]
  end = runs["final"]["eval/all/accuracy"]
  print(f"train reward {first:.3f} -> {last:.3f}; test accuracy {start:.3f} -> {end:.3f}")
  # Each mean is over 3 x 128 rollouts (sd ~0.03 at these rewards): a 0.08 rise is ~2.7 sd of
  # their difference. Test accuracy: 8 answers x 128 prompts (sd ~0.02 each).
  assert last > first + 0.08
  assert end > start + 0.08
  assert all(m["skipped"] == 0 for m in train)
  assert all(m["optimizer_steps"] == 2 and m["reference_forwards"] == 2 for m in train)
  for key in ("reward_var_within", "grad_norm", "kl", "clip_frac", "response_length",
              "zero_var_frac", "time/rollout", "time/reference", "time/update"):
    assert all(np.isfinite(m[key]) for m in train), key


def test_full_forward_scores_sampled_tokens_like_the_sampler(runs):
  """pi_old recomputed by the trainer's forward equals the sampler's cached-decoding log-probs."""
  gaps = [m["sampler_logprob_gap"] for m in runs["metrics"] if "sampler_logprob_gap" in m]
  assert len(gaps) == ITERATIONS and max(gaps) < 1e-4


def test_offline_rif_in_the_job(runs):
  with open(os.path.join(runs["workdir"], rft.RIF_FILE)) as f:
    saved = json.load(f)
  stats = saved["stats"]
  assert stats["num_instances"] == SYNTHETIC["train_size"]
  assert 0 < stats["kept_fraction"] < 1
  assert stats["num_kept"] == len(saved["kept_ids"]) == SYNTHETIC["train_size"] - stats[
      "num_all_wrong"]
  assert runs["final"]["rif/kept_fraction"] == stats["kept_fraction"]


# ----------------------------------------------------------------------------- constructed cases

CONFIG = ModelConfig.tiny(vocab_size=64)


def prompt_batch(ids: list[str], length: int = 8) -> dict:
  """A prompt batch with one 4-token image per prompt; row i's pixels all equal int(id)."""
  b = len(ids)
  prompt = np.full((b, length), 3, np.int32)
  prompt[:, -5:-1] = CONFIG.image_token_id
  return dict(prompt_ids=prompt, prompt_mask=np.ones_like(prompt),
              pixel_values=np.repeat(np.asarray(ids, np.float32), 16)[:, None]
              * np.ones((1, 4), np.float32),
              image_grid_thw=np.tile(np.array([[1, 4, 4]], np.int32), (b, 1)),
              answer=np.array(["a"] * b), task=np.array(["t" if int(i) % 2 else "u" for i in ids]),
              id=np.asarray(ids))


def test_offline_filter_keeps_the_learnable_instances():
  """10 instances with pass counts 0..4 of 4 rollouts (two each), in batches of 4."""
  passes = {str(i): i // 2 for i in range(10)}  # ids 0,1: 0 of 4; ids 8,9: 4 of 4
  calls = []

  def sample(batch):
    calls.append(len(batch["id"]))
    correct = np.array([[k < passes[i] for k in range(4)] for i in batch["id"]], np.float32)
    return {"accuracy": correct}

  ids = [str(i) for i in range(10)]
  batches = [prompt_batch(ids[i:i + 4]) for i in range(0, 10, 4)]
  kept, stats = rollout.offline_filter(sample, batches, batch_size=4, model_config=CONFIG)
  assert calls == [4, 4, 4]  # the last batch (2 instances) was padded to the compiled size
  assert sorted(kept.tolist(), key=int) == ids[2:]
  assert stats["kept_fraction"] == 0.8 and stats["pass_count_hist"] == [2, 2, 2, 2, 2]
  assert stats["per_task/t/num_kept"] == 4 and stats["per_task/u/num_kept"] == 4
  kept, stats = rollout.offline_filter(sample, batches, batch_size=4, model_config=CONFIG,
                                       drop_all_right=True)
  assert sorted(kept.tolist(), key=int) == ids[2:8] and stats["kept_fraction"] == 0.6

  source = [{"id": i.encode()} for i in ids]
  subset = rollout.SubsetSource(source, kept)
  assert [r["id"].decode() for r in subset] == ids[2:8]


def test_online_filter_refills_with_learnable_groups():
  """Rollout batches of 4 groups; groups whose accuracy is all 0 or all 1 are dropped."""
  draws = iter([
      (["0", "1", "2", "3"], [[0, 0], [1, 0], [1, 1], [0, 1]], 8),
      (["4", "5", "6", "7"], [[1, 1], [0, 1], [0, 0], [1, 0]], 10),  # longer prompts
  ])

  def next_groups():
    ids, accuracy, length = next(draws)
    groups = prompt_batch(ids, length)
    groups["accuracy"] = np.asarray(accuracy, np.float32)
    groups["reward"] = groups["accuracy"]
    return groups

  groups, stats = rollout.collect_groups(next_groups, target=3, mode="online", pad_id=0,
                                         model_config=CONFIG)
  assert groups["id"].tolist() == ["1", "3", "5"]  # arrival order; group "7" is surplus
  assert groups["prompt_ids"].shape == (3, 10)  # left-padded to the longer batch
  assert groups["prompt_mask"][:2, :2].sum() == 0 and groups["prompt_mask"][2].all()
  np.testing.assert_array_equal(groups["pixel_values"][::16, 0], [1, 3, 5])
  assert stats["online_filter/num_batches"] == 2 and stats["online_filter/num_kept"] == 4
  with pytest.raises(RuntimeError, match="short of"):
    rollout.collect_groups(lambda: dict(prompt_batch(["0"]), accuracy=np.zeros((1, 2))),
                           target=2, mode="online", max_batches=3, pad_id=0,
                           model_config=CONFIG)


def test_configs_build_valid_grpo_configs():
  sys.path.insert(0, ROOT)
  try:
    from configs import rft_qwen2_5_vl_7b, rft_synthetic  # noqa: PLC0415
  finally:
    sys.path.remove(ROOT)
  paper = rft.grpo_config(rft_qwen2_5_vl_7b.get_config("task=geometry3k"))
  assert (paper.n, paper.temperature, paper.top_p, paper.eval_temperature) == (8, 1.0, 0.99, 0.5)
  assert (paper.eps_low, paper.eps_high, paper.dual_clip, paper.kl_coef) == (0.2, 0.3, 3.0, 0.01)
  assert paper.kl_estimator == "low_var_kl" and paper.kl_enabled and paper.reward == "cot_boxed"
  assert (paper.rollout_batch_size, paper.update_batch_size) == (512, 128)
  assert (paper.max_prompt_length, paper.max_response_length) == (4096, 1024)
  assert (paper.lr, paper.weight_decay, paper.grad_clip) == (1e-6, 0.01, 1.0)
  c = rft_qwen2_5_vl_7b.get_config("task=geometry3k")
  assert c.num_epochs == 10 and c.optim.warmup_ratio == 0 and c.compute_dtype == "bfloat16"
  assert (c.data.min_pixels, c.data.max_pixels) == (200_704, 1_003_520)
  ablation = rft.grpo_config(rft_qwen2_5_vl_7b.get_config("task=gqa,no_kl,no_cot"))
  assert not ablation.kl_enabled and ablation.reward == "no_cot"
  local = rft_synthetic.get_config("runlocal,rif=online")
  assert rft.grpo_config(local).n == 4 and local.rif.mode == "online"
  with pytest.raises(ValueError, match="unknown config arg"):
    rft_synthetic.get_config("rff=offline")
