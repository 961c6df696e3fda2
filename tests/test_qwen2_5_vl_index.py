"""Host-side index math (M-RoPE positions, vision windows) against transformers' own functions."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import vision_utils

import hf_fixtures
from cpt_jax.models import ModelConfig, get_rope_index, prepare_vision_inputs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return hf_fixtures.checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def config(ckpt):
  return ModelConfig.from_hf_dict(ckpt.model.config.to_dict())


def _hf_rope_index(ckpt, ids, mask, grids):
  ids_t = torch.as_tensor(ids, dtype=torch.long)
  pos, deltas = ckpt.model.model.get_rope_index(
      ids_t, mm_token_type_ids=(ids_t == ckpt.image_token_id).int(),
      image_grid_thw=None if grids is None else torch.as_tensor(grids),
      attention_mask=torch.as_tensor(mask))
  return pos.numpy(), deltas.numpy()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("with_images", [False, True])
def test_rope_index_matches_transformers(ckpt, config, side, with_images):
  if with_images:
    grids = np.asarray([(1, 4, 8), (1, 8, 12), (1, 6, 2)])
    rows = [hf_fixtures.prompt_ids(ckpt, [tuple(grids[0]), "and", tuple(grids[1]), "?"]),
            hf_fixtures.prompt_ids(ckpt, ["How many red spheres are there?", tuple(grids[2])])]
  else:
    grids = None
    rows = [hf_fixtures.prompt_ids(ckpt, ["What color?"]),
            hf_fixtures.prompt_ids(ckpt, ["How many red spheres are there in the picture?"])]
  ids, mask = hf_fixtures.pad_batch(rows, pad_id=0, side=side)
  pos, deltas = get_rope_index(config, ids, mask, grids)
  hf_pos, hf_deltas = _hf_rope_index(ckpt, ids, mask, grids)
  np.testing.assert_array_equal(pos, hf_pos)
  np.testing.assert_array_equal(deltas, hf_deltas)
  assert pos.dtype == np.int32 and pos.shape == (3, *ids.shape) and deltas.shape == (2, 1)


def test_rope_index_errors(config):
  img = config.image_token_id
  with pytest.raises(ValueError, match="more images than image_grid_thw provides"):
    get_rope_index(config, np.asarray([[1, img, img, img, img, 2]]), None, np.zeros((0, 3)))
  with pytest.raises(ValueError, match=r"needs 4 consecutive image tokens, found 3"):
    get_rope_index(config, np.asarray([[1, img, img, img, 2]]), None, np.asarray([(1, 4, 4)]))
  with pytest.raises(ValueError, match="has 2 grids but the batch has image tokens for 1"):
    get_rope_index(config, np.asarray([[1, img, img, img, img]]), None,
                   np.asarray([(1, 4, 4), (1, 4, 4)]))


@pytest.mark.parametrize("window_size", [56, 112])
def test_vision_windows_match_transformers(config, window_size):
  vision = dataclasses.replace(config.vision, window_size=window_size)
  grids = np.asarray([(1, 12, 20), (2, 8, 8), (1, 4, 4), (1, 2, 6)])
  ours = prepare_vision_inputs(grids, vision)
  grids_t = torch.as_tensor(grids)
  window_index, cu_windows = vision_utils.get_vision_window_index(
      grids_t, spatial_merge_size=2, window_size=window_size, patch_size=14)
  cu_full = vision_utils.get_vision_cu_seqlens(grids_t)
  hf_rotary = vision_utils.get_vision_position_ids(grids_t, 2)

  np.testing.assert_array_equal(ours["rotary_ids"], hf_rotary.numpy())
  patch_order = (window_index.numpy()[:, None] * 4 + np.arange(4)).ravel()
  for layout, cu in (("window", cu_windows), ("full", cu_full)):
    gather, lengths, scatter = (ours[f"{layout}_{k}"] for k in ("gather", "lengths", "scatter"))
    np.testing.assert_array_equal(lengths, np.diff(cu.numpy()))
    # Blocks hold the patches in the reference's window order, padded at the end.
    valid = np.arange(gather.shape[1])[None, :] < lengths[:, None]
    np.testing.assert_array_equal(gather[valid], patch_order)
    # scatter inverts gather.
    np.testing.assert_array_equal(gather.ravel()[scatter], np.arange(len(patch_order)))


def test_vision_grid_errors(config):
  with pytest.raises(ValueError, match="multiples of spatial_merge_size 2"):
    prepare_vision_inputs(np.asarray([(1, 5, 4)]), config.vision)
