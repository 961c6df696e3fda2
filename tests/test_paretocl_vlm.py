"""ParetoCL for the VLM (cpt_jax.paretocl.vlm) on a tiny text-only Qwen2 model."""
from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

import cpt_jax  # noqa: F401  (flax eager sharding off)
from cpt_jax import models
from cpt_jax.paretocl import vlm
from cpt_jax.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 64
CONFIG = models.ModelConfig.tiny(vocab_size=VOCAB, vision=None)
SWEEP = jnp.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])


@nnx.jit
def all_logits(model, input_ids, alphas, attention_mask):
  """logits [K, B, S, V] of every preference (jitted: eager tiny-model calls are slow)."""
  return model(input_ids, alphas, attention_mask=attention_mask)


@pytest.fixture(scope="module")
def fresh_model():
  """The tiny ParetoVLM as built (B = 0); tests use copies (`clone`)."""
  return vlm.ParetoVLM(models.init_from_config(CONFIG, 0), rank=4, hyper_hidden=16,
                       rngs=nnx.Rngs(0))


def clone(model, up_seed=None):
  """An independent copy of `model`; with up_seed, B is random so preferences change logits."""
  graphdef, state = nnx.split(model)
  model = nnx.merge(graphdef, jax.tree.map(jnp.copy, state))
  if up_seed is not None:
    up = model.adapter.up
    up[...] = 0.5 * jax.random.normal(jax.random.key(up_seed), up.shape)
  return model


def sft_batch(rng, b=4, s=10, prompt=4):
  ids = rng.integers(0, VOCAB - 8, (b, s)).astype(np.int32)
  lengths = rng.integers(prompt + 2, s + 1, (b,))
  attn = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = (attn * (np.arange(s)[None] >= prompt)).astype(np.int32)
  return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_answer_loss(logits, ids, loss_mask):
  """Token-mean answer cross-entropy computed by hand; logits [B, S, V]."""
  logp = np_log_softmax(logits[:, :-1])
  nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
  m = loss_mask[:, 1:]
  return (nll * m).sum() / max(m.sum(), 1)


def np_entropy(logits):
  logp = np_log_softmax(logits)
  return -(np.exp(logp) * logp).sum(-1)


def optim_config(**kw):
  c = ConfigDict(dict(name="adamw", lr=3e-2, schedule="constant", warmup_ratio=0.0, b1=0.9,
                      b2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.0, grad_clip_norm=0.0,
                      grad_accum_steps=1, freeze=("base",)))
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def joint_batch():
  rng = np.random.default_rng(0)
  new, replay = sft_batch(rng, b=3, s=10), sft_batch(rng, b=2, s=8)
  return new, replay, vlm.concat_batches(CONFIG, new, replay)


def test_zero_init_up_gives_base_logits_for_every_alpha(fresh_model):
  model = fresh_model
  ids = np.random.default_rng(0).integers(0, VOCAB, (2, 6)).astype(np.int32)
  base = np.asarray(nnx.jit(lambda m, x: m(x))(model.base, ids))
  alphas = vlm.inference_preferences(6, seed=3)
  out = np.asarray(all_logits(model, ids, alphas, np.ones_like(ids)))  # [K, B, S, V]
  assert out.shape == (6, 2, 6, VOCAB)
  np.testing.assert_array_equal(out, np.broadcast_to(base, out.shape))


def test_concat_batches_pads_marks_rows_and_recomputes_positions(joint_batch):
  new, replay, batch = joint_batch
  assert batch["input_ids"].shape == (5, 10) and batch["position_ids"].shape == (3, 5, 10)
  np.testing.assert_array_equal(batch["is_new"], [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(batch["input_ids"][3:, :8], replay["input_ids"])
  np.testing.assert_array_equal(batch["loss_mask"][3:, 8:], 0)
  expected = np.cumsum(batch["attention_mask"], 1) - 1
  np.testing.assert_array_equal(batch["position_ids"][0] * batch["attention_mask"],
                                np.maximum(expected, 0) * batch["attention_mask"])
  with pytest.raises(ValueError, match="loss_mask"):
    vlm.concat_batches(CONFIG, {k: v for k, v in new.items() if k != "loss_mask"}, replay)
  with pytest.raises(ValueError, match="is_new"):
    vlm.device_batch(new)


def test_loss_matches_hand_computation(joint_batch, fresh_model):
  _, _, batch = joint_batch
  model = clone(fresh_model, up_seed=1)
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  alphas = jnp.array([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]])
  dev = vlm.device_batch(batch)
  loss, aux = jax.jit(lambda p, b, a: vlm.paretocl_loss(graphdef, p, b, a))(params, dev, alphas)

  # Right padding: jit's default text positions equal the batch's on every real token.
  logits = np.asarray(all_logits(model, batch["input_ids"], alphas,
                                 batch["attention_mask"]))  # [K, B, S, V]
  new, rep = batch["is_new"] == 1, batch["is_new"] == 0
  ids, mask = batch["input_ids"], batch["loss_mask"]
  l_new = np.array([np_answer_loss(lg[new], ids[new], mask[new]) for lg in logits])
  l_rep = np.array([np_answer_loss(lg[rep], ids[rep], mask[rep]) for lg in logits])
  assert np.ptp(l_new) > 1e-3  # the preferences do change the loss
  a = np.asarray(alphas)
  np.testing.assert_allclose(loss, np.mean(a[:, 0] * l_rep + a[:, 1] * l_new), rtol=1e-5)
  np.testing.assert_allclose(aux["loss_new"], l_new.mean(), rtol=1e-5)
  np.testing.assert_allclose(aux["loss_replay"], l_rep.mean(), rtol=1e-5)


@pytest.mark.parametrize("mode", vlm.ENTROPY_MODES)
def test_min_entropy_choice_matches_brute_force(mode, fresh_model):
  batch = sft_batch(np.random.default_rng(5), b=6, s=10)
  model = clone(fresh_model, up_seed=2)
  graphdef, state = nnx.split(model)
  predict = vlm.make_predict_step(graphdef, num_preferences=20, seed=0, entropy=mode)
  out = jax.device_get(predict(nnx.to_pure_dict(state), batch))

  alphas = np.asarray(vlm.inference_preferences(20, seed=0))
  np.testing.assert_array_equal(out["alphas"], alphas)
  logits = np.asarray(all_logits(model, batch["input_ids"], jnp.asarray(alphas),
                                 batch["attention_mask"]))  # [K, B, S, V]
  ent = np_entropy(logits[:, :, :-1])  # [K, B, S-1]
  target = batch["loss_mask"][:, 1:]
  if mode == "teacher_forced":
    scores = (ent * target).sum(-1) / target.sum(-1)
  else:
    first = np.argmax(target, axis=1)  # position of the last prompt token
    scores = ent[:, np.arange(6), first]
  np.testing.assert_allclose(out["entropy"], scores, rtol=1e-4, atol=1e-5)
  chosen = scores.argmin(0)
  np.testing.assert_array_equal(out["chosen"], chosen)
  if mode == "first_token":  # here the choice differs between samples
    assert len(set(chosen.tolist())) > 1
  np.testing.assert_allclose(out["logits"], logits[chosen, np.arange(6)], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="entropy mode"):
    vlm.make_predict_step(graphdef, entropy="mean")


def test_training_on_conflicting_targets_moves_the_trade_off_with_alpha(fresh_model):
  """New and replay rows share a prompt but answer X vs Y; after train_task the preference
  sweep goes from favouring Y (replay, alpha = (1, 0)) to favouring X (new, alpha = (0, 1))."""
  prompt, x_tok, y_tok, eos = [5, 9, 13, 17], 30, 40, VOCAB - 1

  def batch_of(answer, b=4):
    ids = np.tile(np.array(prompt + [answer, eos], np.int32), (b, 1))
    mask = np.zeros_like(ids)
    mask[:, len(prompt):] = 1
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": mask}

  new, replay = batch_of(x_tok), batch_of(y_tok)
  model = clone(fresh_model)
  base_before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model.base)))
  config = ConfigDict(dict(rank=4, hyper_hidden=16, num_preferences=5, concentration=1.0,
                           optim=optim_config()))
  losses = []
  vlm.train_task(model, iter([new] * 60), iter([replay] * 60), 60, config, seed=0,
                 on_step=lambda i, m: losses.append(float(m["loss"])))
  assert losses[-1] < losses[0]
  # Backbone frozen: bit-identical; the adapter moved.
  jax.tree.map(np.testing.assert_array_equal, base_before, nnx.to_pure_dict(nnx.state(model.base)))
  assert np.abs(np.asarray(model.adapter.up[...])).max() > 0

  ids = new["input_ids"][:1]
  logits = np.asarray(all_logits(model, ids, SWEEP, np.ones_like(ids)))[:, 0, len(prompt) - 1]
  margin = logits[:, x_tok] - logits[:, y_tok]  # > 0: prefers the new answer
  assert margin[0] < 0 < margin[2], margin
  assert margin[0] < margin[1] < margin[2], margin
  # Different alphas now give different logits.
  assert np.abs(logits[0] - logits[2]).max() > 1e-2


def test_concat_batches_keeps_image_rows_positions_and_pixels():
  """Joint M-RoPE positions and pixels equal those of each batch prepared on its own."""
  config = models.ModelConfig.tiny(vocab_size=VOCAB)
  image = [config.vision_start_token_id] + [config.image_token_id] * 4 + [config.vision_end_token_id]

  def image_batch(rows, length, fill):
    ids = np.zeros((len(rows), length), np.int32)
    attn = np.zeros_like(ids)
    for i, row in enumerate(rows):
      ids[i, :len(row)], attn[i, :len(row)] = row, 1
    grid = np.tile(np.array([[1, 4, 4]], np.int32), ((ids == config.image_token_id).sum() // 4, 1))
    pixels = np.full((16 * len(grid), 1176), fill, np.float32)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": attn.copy(),
            "pixel_values": pixels, "image_grid_thw": grid}

  new = image_batch([[1, 2] + image + [7, 8], [3] + image + [9]], 10, 1.0)
  replay = image_batch([image + [4, 5, 6, 7, 8, 9]], 12, 2.0)
  batch = vlm.concat_batches(config, new, replay)
  for part, rows in ((new, slice(0, 2)), (replay, slice(2, 3))):
    alone = models.prepare_inputs(config, part["input_ids"], part["attention_mask"],
                                  part["image_grid_thw"])["position_ids"]
    real = part["attention_mask"].astype(bool)
    np.testing.assert_array_equal(batch["position_ids"][:, rows, :alone.shape[2]][:, real],
                                  alone[:, real])
  np.testing.assert_array_equal(batch["pixel_values"][:, 0], [1.0] * 32 + [2.0] * 16)
  assert batch["image_grid_thw"].shape == (3, 3) and "vision_inputs" in batch


@pytest.mark.parametrize("tied", [False, True])
def test_fold_preference_equals_the_adapter_at_that_alpha(fresh_model, tied):
  if tied:
    base = models.init_from_config(dataclasses.replace(CONFIG, tie_word_embeddings=True), 0)
    model = vlm.ParetoVLM(base, rank=4, hyper_hidden=16, rngs=nnx.Rngs(0))
    model.adapter.up[...] = 0.5 * jax.random.normal(jax.random.key(4), model.adapter.up.shape)
  else:
    model = clone(fresh_model, up_seed=4)
  alpha = jnp.array([0.3, 0.7])
  folded = vlm.fold_preference(model, alpha)
  assert folded.lm_head is not None and model.base.lm_head is (None if tied else model.base.lm_head)
  hidden = jax.random.normal(jax.random.key(5), (2, 3, CONFIG.text.hidden_size))
  np.testing.assert_allclose(folded.logits(hidden), model.logits(hidden, alpha), rtol=1e-5,
                             atol=1e-5)
  assert np.abs(np.asarray(folded.logits(hidden) - model.base.logits(hidden))).max() > 1e-2


def test_prompt_select_matches_brute_force_on_left_padded_prompts(fresh_model):
  model = clone(fresh_model, up_seed=6)
  rng = np.random.default_rng(7)
  ids = rng.integers(0, VOCAB - 8, (5, 7)).astype(np.int32)
  lengths = np.array([7, 4, 4, 7, 4])
  mask = (np.arange(7)[None] >= 7 - lengths[:, None]).astype(np.int32)  # left padding
  graphdef, state = nnx.split(model)
  out = jax.device_get(vlm.make_prompt_select_step(graphdef, num_preferences=20)(
      nnx.to_pure_dict(state), {"input_ids": ids, "attention_mask": mask}))
  alphas = vlm.inference_preferences(20)
  for length in (4, 7):  # the prompts unpadded: their next-token distributions per alpha
    rows = np.flatnonzero(lengths == length)
    alone = ids[rows, 7 - length:]
    logits = np.asarray(all_logits(model, alone, alphas, np.ones_like(alone)))[:, :, -1]
    ent = np_entropy(logits)  # [K, rows]
    np.testing.assert_allclose(out["entropy"][:, rows], ent, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out["chosen"][rows], ent.argmin(0))


def test_cpt_config_fields_build_the_model_and_optimizer():
  sys.path.insert(0, ROOT)  # config files import `configs.common`, found from the repo root
  try:
    from configs.cpt import paretocl_qwen2_5_vl_7b  # noqa: PLC0415
  finally:
    sys.path.remove(ROOT)
  config = paretocl_qwen2_5_vl_7b.get_config("runlocal")
  assert config.method == "paretocl" and config.paretocl.num_preferences == 5
  model = vlm.build(models.init_from_config(CONFIG, 0), config.paretocl)
  assert model.adapter.up.shape == (config.paretocl.rank, VOCAB)
  params = nnx.to_pure_dict(nnx.state(model))
  optim.make_optimizer(config.paretocl.optim, params, total_steps=10)
