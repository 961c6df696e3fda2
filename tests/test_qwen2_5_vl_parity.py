"""Logits of the Flax Qwen2.5-VL equal Hugging Face's on tiny random checkpoints (float32)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flax import nnx

from cpt_jax.models import load_pretrained, prepare_inputs
import hf_fixtures

TOL = 1e-4


@nnx.jit
def _forward(model, input_ids, attention_mask, pixel_values, position_ids, vision_inputs):
  return model(input_ids, attention_mask, pixel_values, position_ids=position_ids,
               vision_inputs=vision_inputs)


def _check_parity(ckpt, model, rows, grids=None, side="left"):
  input_ids, mask = hf_fixtures.pad_batch(rows, pad_id=0, side=side)
  pixels = None if grids is None else hf_fixtures.random_pixels(grids)
  grids = None if grids is None else np.asarray(grids)
  extra = prepare_inputs(model.config, input_ids, mask, grids)
  ours = np.asarray(_forward(model, input_ids, mask, pixels, extra["position_ids"],
                             extra["vision_inputs"]))
  theirs = hf_fixtures.hf_logits(ckpt, input_ids, mask, pixels, grids)
  real = mask.astype(bool)  # logits at padding positions are meaningless in both
  assert ours.shape == theirs.shape
  diff = np.abs(ours[real] - theirs[real]).max()
  assert diff <= TOL, f"max |logits - HF| = {diff}"
  assert np.abs(theirs[real]).max() > 1.0  # the comparison is not between near-zero numbers


# Vision depth 2, full attention in block 1 only, 4 x 4 merged-token windows, untied head.
@pytest.fixture(scope="module")
def window_ckpt(tmp_path_factory):
  return hf_fixtures.checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def window_model(window_ckpt):
  return load_pretrained(window_ckpt.path)


# Vision depth 3, full attention in blocks 0 and 2, 2 x 2 merged-token windows, tied head.
@pytest.fixture(scope="module")
def fullatt_ckpt(tmp_path_factory):
  return hf_fixtures.checkpoint(tmp_path_factory, vision_depth=3, fullatt_block_indexes=(0, 2),
                                window_size=56, tie_word_embeddings=True, seed=1)


def test_text_only(window_ckpt, window_model):
  ids = hf_fixtures.prompt_ids(window_ckpt, ["How many red spheres are there?"])
  _check_parity(window_ckpt, window_model, [ids])


def test_one_image(window_ckpt, window_model):
  ids = hf_fixtures.prompt_ids(window_ckpt, [(1, 8, 8), "What color is the cube?"])
  _check_parity(window_ckpt, window_model, [ids], grids=[(1, 8, 8)])


def test_two_images_of_different_sizes_with_partial_windows(window_ckpt, window_model):
  # The second image has 6 x 10 merged tokens in 4 x 4 windows: windows of 4x4, 4x2, 2x4, 2x2.
  grids = [(1, 4, 8), (1, 12, 20)]
  ids = hf_fixtures.prompt_ids(window_ckpt, ["Compare", grids[0], "and", grids[1], "now."])
  _check_parity(window_ckpt, window_model, [ids], grids=grids)


def test_padded_batch_of_two(window_ckpt, window_model):
  grids = [(1, 4, 8), (1, 8, 4)]
  rows = [hf_fixtures.prompt_ids(window_ckpt, [grids[0], "What color?"]),
          hf_fixtures.prompt_ids(window_ckpt, ["How many red spheres are there in the picture?",
                                               grids[1]])]
  _check_parity(window_ckpt, window_model, rows, grids=grids, side="left")


@pytest.mark.parametrize("layout", ["out_in", "blocks"])
def test_decoding_copies_compute_the_same_logits(window_ckpt, window_model, layout):
  """The decoding copies of cpt_jax.rl.sampler (every Linear kernel [out, in] and the LM head
  [V, D]; or all in float32 column blocks), vision tower included, against HF; the original
  model keeps its layout."""
  copy = window_model.with_kernel_layout(layout)
  q_proj = window_model.language_model.layers[0].self_attn.q_proj
  d, h, hd = q_proj.kernel.shape
  qkv = window_model.visual.blocks[0].attn.qkv.kernel.shape
  if layout == "out_in":
    assert copy.language_model.layers[0].self_attn.q_proj.kernel.shape == (h, hd, d)
    assert copy.visual.blocks[0].attn.qkv.kernel.shape == (*qkv[1:], qkv[0])
    assert copy.lm_head.shape == window_model.lm_head.shape[::-1]
    np.testing.assert_array_equal(copy.head_kernel(), window_model.head_kernel())
  else:
    assert copy.language_model.layers[0].self_attn.q_proj.kernel.shape == (-(-h * hd // 32), d, 32)
    assert copy.visual.blocks[0].attn.qkv.kernel.shape == (-(-math.prod(qkv[1:]) // 32),
                                                           qkv[0], 32)
    with pytest.raises(ValueError, match="decoding copy"):
      copy.head_kernel()
  assert window_model.kernel_layout == q_proj.kernel_layout == "in_out"
  with pytest.raises(ValueError, match=f"already {layout!r}"):
    copy.with_kernel_layout("out_in")
  grids = [(1, 4, 8), (1, 8, 4)]
  rows = [hf_fixtures.prompt_ids(window_ckpt, [grids[0], "What color?"]),
          hf_fixtures.prompt_ids(window_ckpt, ["How many red spheres?", grids[1]])]
  _check_parity(window_ckpt, copy, rows, grids=grids, side="left")


def test_several_full_attention_blocks_and_tied_head(fullatt_ckpt):
  model = load_pretrained(fullatt_ckpt.path)
  assert model.config.tie_word_embeddings and model.lm_head is None
  grids = [(1, 6, 10), (1, 4, 4)]
  ids = hf_fixtures.prompt_ids(fullatt_ckpt, [grids[0], "and", grids[1], "What color?"])
  _check_parity(fullatt_ckpt, model, [ids], grids=grids)
  for layout in ("out_in", "blocks"):  # the head is the embedding table
    _check_parity(fullatt_ckpt, model.with_kernel_layout(layout), [ids], grids=grids)


def test_text_only_qwen2_checkpoint(tmp_path_factory):
  ckpt = hf_fixtures.qwen2_checkpoint(tmp_path_factory)
  model = load_pretrained(ckpt.path)
  assert model.config.vision is None and model.visual is None
  rows = [hf_fixtures.prompt_ids(ckpt, ["What color?"]),
          hf_fixtures.prompt_ids(ckpt, ["How many red spheres are there in the picture?"])]
  input_ids, mask = hf_fixtures.pad_batch(rows, pad_id=0, side="left")
  ours = np.asarray(_forward(model, input_ids, mask, None, None, None))
  # Padded rows count positions from their first real token, as HF generate does.
  positions = torch.as_tensor(np.maximum(mask.cumsum(-1) - 1, 0), dtype=torch.long)
  with torch.no_grad():
    theirs = ckpt.model(input_ids=torch.as_tensor(input_ids, dtype=torch.long),
                        attention_mask=torch.as_tensor(mask, dtype=torch.long),
                        position_ids=positions).logits.numpy()
  real = mask.astype(bool)
  assert np.abs(ours[real] - theirs[real]).max() <= TOL
