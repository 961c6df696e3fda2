"""Shared job helpers of cpt_jax.train.loop: a pretrained model streams straight to its
shardings (same weights as an unsharded load), and the abstract params / train state carry
the shardings the trainers place their arrays with."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

import hf_fixtures
from cpt_jax import models
from cpt_jax import sharding
from cpt_jax.train import loop, optim


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"fsdp": 2, "tensor": 4})  # the tiny model has 2 KV heads


def test_build_model_streams_pretrained_weights_to_their_shardings(tmp_path_factory, mesh):
  ckpt = hf_fixtures.qwen2_checkpoint(tmp_path_factory)
  config = ConfigDict(dict(seed=0, model=dict(pretrained=ckpt.path, preset="7b", remat="none",
                                              attention_impl="xla")))
  model_config = loop.make_model_config(config, ckpt.tokenizer)
  model = loop.build_model(config, model_config, jnp.float32, mesh, None)
  _, params = loop.split_params(model)
  _, _, expected_sh = loop.abstract_model_params(
      lambda: models.Qwen2_5_VL(model_config, dtype=jnp.float32, param_dtype=jnp.float32,
                                rngs=nnx.Rngs(0)), mesh, None)
  reference = loop.split_params(models.load_pretrained(ckpt.path))[1]
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert len(leaves) == len(jax.tree.leaves(reference))
  for (path, value), sh, ref in zip(leaves, jax.tree.leaves(expected_sh),
                                    jax.tree.leaves(reference)):
    assert value.sharding.is_equivalent_to(sh, value.ndim), jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(value), np.asarray(ref))
  kernel = params["language_model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
  assert not kernel.sharding.is_fully_replicated  # placed on the mesh, not one device


def test_abstract_train_state_shards_moments_like_params(mesh):
  model_config = models.ModelConfig.tiny(vocab_size=64, vision=None)
  _, abstract, param_sh = loop.abstract_model_params(
      lambda: models.Qwen2_5_VL(model_config, rngs=nnx.Rngs(0)), mesh, None)
  for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(param_sh)):
    assert a.sharding == s
  opt_config = ConfigDict(dict(name="adamw", lr=1e-3, schedule="constant", warmup_ratio=0.0,
                               b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.0,
                               grad_clip_norm=1.0, grad_accum_steps=1, freeze=()))
  optimizer = optim.make_optimizer(opt_config, abstract, 10)
  state, state_sh = loop.abstract_train_state(
      lambda p, rng: optim.create_train_state(p, optimizer, rng), abstract, param_sh, mesh,
      jax.random.PRNGKey(0))
  assert jax.tree.map(lambda a: a.sharding, state.params) == param_sh
  assert state_sh.step.is_fully_replicated and state.rng.sharding.is_fully_replicated
  down = abstract["language_model"]["layers"][0]["mlp"]["down_proj"]["kernel"]
  moments = [m for m in jax.tree.leaves(state.opt_state) if m.shape == down.shape]
  assert moments and all(m.sharding == down.sharding for m in moments)


def test_stacked_batches_keep_the_example_dim_sharded(mesh):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 100, (4, 6)).astype(np.int32)
  batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
           "position_ids": np.stack([np.broadcast_to(np.arange(6), (4, 6))] * 3), "task": ["a"] * 4}
  other = {**batch, "input_ids": ids + 1}
  single = loop._device_batch([batch], mesh, None)
  stacked = loop._device_batch([batch, other], mesh, None)
  assert "task" not in stacked and stacked["input_ids"].shape == (2, 4, 6)
  np.testing.assert_array_equal(stacked["input_ids"][1], ids + 1)
  assert single["input_ids"].sharding.spec[0] == ("data", "fsdp")
  for key, dim in (("input_ids", 0), ("loss_mask", 0), ("position_ids", 1)):
    assert stacked[key].sharding.spec[dim + 1] == single[key].sharding.spec[dim], key
    assert stacked[key].sharding.spec[0] is None
  one, multi = object(), object()
  [(fn, device_batch, n)] = loop.step_calls([batch, other], one, multi, mesh, None)
  assert (fn, n) == (multi, 2) and device_batch["input_ids"].shape == (2, 4, 6)
  shorter = {**batch, "input_ids": ids[:, :5]}
  calls = loop.step_calls([batch, shorter], one, multi, mesh, None)
  assert [(fn, b["input_ids"].shape, n) for fn, b, n in calls] == [(one, (4, 6), 1),
                                                                   (one, (4, 5), 1)]


def test_steps_in_call_stop_at_checkpoints_evaluations_and_the_end():
  runs, step = [], 0
  while step < 14:
    n = loop.steps_in_call(step, 14, 4, every=[10, 8])
    runs.append(n)
    step += n
  # 0-4, 4-8 (evaluation at 8), singles to the checkpoint at 10, 10-14 (the end).
  assert runs == [4, 4, 1, 1, 4]
  assert loop.steps_in_call(8, 14, 4, every=[10]) == 1
  assert loop.steps_in_call(10, 14, 4, every=[10]) == 4
  assert loop.steps_in_call(0, 14, 1, every=[10]) == 1


def test_steps_per_call_below_one_is_named(tmp_path):
  config = ConfigDict(dict(compute_dtype="float32", steps_per_call=0))
  with pytest.raises(ValueError, match="steps_per_call must be >= 1, got 0"):
    loop.run(config, str(tmp_path))
