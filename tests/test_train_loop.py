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
