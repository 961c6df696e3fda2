"""ModelConfig: presets against transformers' own models, HF config.json layouts, validation."""
from __future__ import annotations

import dataclasses
import math

import jax
import pytest
import torch
import transformers
from flax import nnx

from cpt_jax.models import ModelConfig, Qwen2_5_VL

# config.json of Qwen2.5-VL-7B-Instruct as published (original flat layout).
QWEN2_5_VL_7B_CONFIG_JSON = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu",
    "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
    "max_position_embeddings": 128000, "max_window_layers": 28, "model_type": "qwen2_5_vl",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
    "use_cache": True, "use_sliding_window": False,
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
        "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
        "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
        "temporal_patch_size": 2},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


def test_original_flat_7b_config_json_is_the_7b_preset():
  assert ModelConfig.from_hf_dict(QWEN2_5_VL_7B_CONFIG_JSON) == ModelConfig.qwen2_5_vl_7b()


@pytest.mark.parametrize("preset", ["qwen2_5_vl_3b", "qwen2_5_vl_7b"])
def test_preset_parameter_count_equals_transformers_model(preset):
  config = getattr(ModelConfig, preset)()
  with torch.device("meta"):
    hf_model = transformers.Qwen2_5_VLForConditionalGeneration(
        transformers.Qwen2_5_VLConfig(**config.to_hf_dict()))
  ours = nnx.eval_shape(lambda: Qwen2_5_VL(config, rngs=nnx.Rngs(0)))
  n_ours = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(ours, nnx.Param)))
  assert n_ours == sum(p.numel() for p in hf_model.parameters())


@pytest.mark.parametrize("config", [
    ModelConfig.tiny(),
    ModelConfig.qwen2_5_vl_3b(),
    ModelConfig.tiny(vision=None, tie_word_embeddings=True,
                     text=dataclasses.replace(ModelConfig.tiny().text, mrope_section=(8, 0, 0))),
], ids=["tiny", "3b", "text_only"])
def test_hf_dict_round_trip(config):
  assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config


def test_transformers_reads_our_config_json():
  config = ModelConfig.tiny()
  hf = transformers.Qwen2_5_VLConfig(**config.to_hf_dict())
  assert hf.text_config.rope_parameters["mrope_section"] == list(config.text.mrope_section)
  assert hf.vision_config.fullatt_block_indexes == list(config.vision.fullatt_block_indexes)
  assert hf.image_token_id == config.image_token_id
  # What transformers writes back (nested layout, its own defaults added) reads back the same.
  assert ModelConfig.from_hf_dict(hf.to_dict()) == config
  text_only = ModelConfig.tiny(
      vision=None, text=dataclasses.replace(ModelConfig.tiny().text, mrope_section=(8, 0, 0)))
  qwen2 = transformers.Qwen2Config(**text_only.to_hf_dict())
  assert ModelConfig.from_hf_dict(qwen2.to_dict()) == text_only


def _tiny_with(text=None, vision=None, **kwargs):
  base = ModelConfig.tiny()
  t = dataclasses.replace(base.text, **(text or {}))
  v = dataclasses.replace(base.vision, **(vision or {}))
  return dataclasses.replace(base, text=t, vision=v, **kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(text=dict(mrope_section=(16, 24, 24))), r"sum\(mrope_section\).*= 64 must equal .* 8"),
    (dict(vision=dict(out_hidden_size=32)), r"vision out_hidden_size 32 != text hidden_size 64"),
    (dict(text=dict(num_heads=5)), r"text hidden_size 64 is not divisible by num_heads 5"),
    (dict(vision=dict(num_heads=3)), r"vision hidden_size 32 is not divisible by num_heads 3"),
    (dict(vision=dict(fullatt_block_indexes=(1, 2))), r"fullatt_block_indexes \[2\] out of range"),
    (dict(vision=dict(window_size=100)), r"window_size 100 is not a positive multiple of .* 28"),
    (dict(text=dict(num_kv_heads=3)), r"num_heads 4 is not a multiple of num_kv_heads 3"),
    (dict(attention_impl="flash"), r"attention_impl 'flash' is not one of"),
    (dict(remat="some"), r"remat 'some' is not one of"),
])
def test_validation_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _tiny_with(**kwargs).validate()


def test_model_construction_validates():
  with pytest.raises(ValueError, match="out_hidden_size"):
    Qwen2_5_VL(_tiny_with(vision=dict(out_hidden_size=32)), rngs=nnx.Rngs(0))


def test_sliding_window_checkpoints_are_rejected():
  with pytest.raises(ValueError, match="use_sliding_window"):
    ModelConfig.from_hf_dict({**QWEN2_5_VL_7B_CONFIG_JSON, "use_sliding_window": True})

