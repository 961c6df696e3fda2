"""HF checkpoint loading: key table both ways, both key layouts, shards, bf16, clear errors."""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx

import hf_fixtures
from cpt_jax.models import (ModelConfig, Qwen2_5_VL, init_from_config, load_hf_state,
                            load_pretrained, save_pretrained)
from cpt_jax.models.qwen2_5_vl import params


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return hf_fixtures.checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def tensors(ckpt):
  """The checkpoint's tensors as save_pretrained wrote them (original layout)."""
  return params.read_safetensors(f"{ckpt.path}/model.safetensors")


@pytest.fixture(scope="module")
def loaded(ckpt):
  return load_pretrained(ckpt.path)


def _abstract(config):
  return nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0)))


def _param_arrays(model):
  return {path: np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
  pa, pb = _param_arrays(a), _param_arrays(b)
  assert pa.keys() == pb.keys()
  for path in pa:
    np.testing.assert_array_equal(pa[path], pb[path], err_msg=str(path))


def test_loaded_weights_are_the_torch_weights(ckpt, loaded):
  hf = {k: v.detach().numpy() for k, v in ckpt.model.state_dict().items()}
  ours = _param_arrays(loaded)
  q = ours[("language_model", "layers", 1, "self_attn", "q_proj", "kernel")]  # [D, H, hd]
  np.testing.assert_array_equal(
      q.reshape(64, -1).T, hf["model.language_model.layers.1.self_attn.q_proj.weight"])
  o = ours[("language_model", "layers", 0, "self_attn", "o_proj", "kernel")]  # [H, hd, D]
  np.testing.assert_array_equal(
      o.reshape(-1, 64).T, hf["model.language_model.layers.0.self_attn.o_proj.weight"])
  patch = ours[("visual", "patch_embed", "kernel")]  # [C*T*P*P, E]
  np.testing.assert_array_equal(
      patch.T.reshape(32, 3, 2, 14, 14), hf["model.visual.patch_embed.proj.weight"])


def test_table_round_trips_every_parameter():
  model = init_from_config(ModelConfig.tiny(), 0)
  exported = {}
  for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    key, transform = params.hf_key_for(".".join(map(str, path)))
    value = np.asarray(variable.get_value())
    exported[key] = transform.to_hf(value, transform.hf_shape(value.shape, model.config))
  _assert_same_params(load_hf_state(_abstract(model.config), exported), model)


def test_newer_key_layout_loads_the_same(tensors, loaded):
  renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else
              "model." + k if k.startswith("visual.") else k): v for k, v in tensors.items()}
  assert "model.visual.merger.mlp.0.weight" in renamed
  _assert_same_params(load_hf_state(_abstract(loaded.config), renamed), loaded)


def test_sharded_checkpoint(ckpt, loaded, tmp_path):
  ckpt.model.save_pretrained(tmp_path, max_shard_size="100KB")
  ckpt.tokenizer.save_pretrained(tmp_path)
  with open(tmp_path / "model.safetensors.index.json") as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1
  _assert_same_params(load_pretrained(tmp_path), loaded)


def test_bfloat16_tensors(tmp_path):
  weights = {"a": torch.randn(3, 5).bfloat16(), "b": torch.arange(4, dtype=torch.int32)}
  safetensors.torch.save_file(weights, tmp_path / "w.safetensors")
  read = params.read_safetensors(tmp_path / "w.safetensors")
  np.testing.assert_array_equal(read["a"].astype(np.float32), weights["a"].float().numpy())
  np.testing.assert_array_equal(read["b"], weights["b"].numpy())


def test_bfloat16_parameters(ckpt):
  model = load_pretrained(ckpt.path, dtype=jax.numpy.bfloat16, param_dtype=jax.numpy.bfloat16)
  dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {np.dtype(jax.numpy.bfloat16)}


def test_missing_unexpected_and_misshapen_tensors_are_named(tensors, loaded):
  broken = dict(tensors)
  del broken["model.norm.weight"]
  broken["model.layers.7.mlp.up_proj.weight"] = np.zeros((128, 64), np.float32)
  broken["model.layers.0.self_attn.k_proj.weight"] = tensors[
      "model.layers.0.self_attn.k_proj.weight"].T
  with pytest.raises(ValueError) as err:
    load_hf_state(_abstract(loaded.config), broken)
  message = str(err.value)
  assert "missing tensors ['model.norm.weight']" in message
  assert "unexpected tensors ['model.layers.7.mlp.up_proj.weight']" in message
  assert "model.layers.0.self_attn.k_proj.weight: checkpoint shape (64, 32), model expects " \
         "(32, 64)" in message


def test_both_layouts_at_once_is_an_error(tensors, loaded):
  duplicated = {**tensors, "model.language_model.norm.weight": tensors["model.norm.weight"]}
  with pytest.raises(ValueError, match="holds both 'model.norm.weight' and "
                                       "'model.language_model.norm.weight'"):
    load_hf_state(_abstract(loaded.config), duplicated)


def test_tied_model_ignores_a_saved_lm_head(tensors, loaded):
  tied = dataclasses.replace(loaded.config, tie_word_embeddings=True)
  model = load_hf_state(_abstract(tied), tensors)  # tensors include lm_head.weight
  assert model.lm_head is None


def test_missing_checkpoint_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_pretrained(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(ModelConfig.tiny().to_hf_dict()))
  with pytest.raises(FileNotFoundError, match="no model.safetensors"):
    load_pretrained(tmp_path)


def test_saving_a_decoding_copy_is_an_error(loaded, tmp_path):
  for layout in ("out_in", "blocks"):
    with pytest.raises(ValueError, match=f"kernels stored {layout!r}"):
      save_pretrained(loaded.with_kernel_layout(layout), tmp_path / "copy")
  assert not (tmp_path / "copy").exists()
