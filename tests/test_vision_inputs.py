"""Vision metadata of a batch split across processes: shifted per-process inputs, concatenated,
are the inputs of the whole batch (what the multi-process SFT job hands the global model)."""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from cpt_jax.models import ModelConfig, init_from_config
from cpt_jax.models.qwen2_5_vl import vision

# Per process: the same image sizes (the multi-process job needs equal local shapes).
GRIDS = [(1, 8, 8), (1, 4, 8)]
PROCESSES = 3


@pytest.fixture(scope="module")
def config():
  return ModelConfig.tiny()


def split_inputs(config):
  local = [vision.prepare_vision_inputs(np.asarray(GRIDS), config.vision)
           for _ in range(PROCESSES)]
  shifted, before = [], np.zeros(3, np.int64)
  for inputs in local:
    shifted.append(vision.shift_vision_inputs(inputs, patches=before[0],
                                              window_slots=before[1], full_slots=before[2]))
    before += vision.vision_slots(inputs)
  return {k: np.concatenate([s[k] for s in shifted]) for k in shifted[0]}


def test_concatenated_shifted_inputs_are_the_global_inputs(config):
  got = split_inputs(config)
  want = vision.prepare_vision_inputs(np.asarray(GRIDS * PROCESSES), config.vision)
  assert sorted(got) == sorted(want)
  for name in ("rotary_ids", "window_lengths", "window_scatter", "full_lengths", "full_scatter"):
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  for name in ("window", "full"):  # padding slots of a block are masked: compare real slots
    real = np.arange(want[f"{name}_gather"].shape[1])[None] < want[f"{name}_lengths"][:, None]
    np.testing.assert_array_equal(got[f"{name}_gather"][real], want[f"{name}_gather"][real])


def test_vision_tower_on_the_global_batch_equals_each_process_alone(config):
  model = init_from_config(config, 0)
  patches = sum(t * h * w for t, h, w in GRIDS)
  pixels = np.random.default_rng(0).standard_normal(
      (PROCESSES * patches, config.vision.patch_dim)).astype(np.float32)
  tower = nnx.jit(lambda m, x, inputs: m.visual(x, inputs))
  local = vision.prepare_vision_inputs(np.asarray(GRIDS), config.vision)
  alone = np.concatenate([np.asarray(tower(model, pixels[i * patches:(i + 1) * patches], local))
                          for i in range(PROCESSES)])
  together = np.asarray(tower(model, pixels, split_inputs(config)))
  error = np.abs(together - alone).max()
  assert error < 1e-6
  # Unshifted, every process's blocks read the first process's patches (attention of the
  # random tiny tower is near uniform, so the outputs move little, but far beyond rounding).
  unshifted = {k: np.concatenate([local[k]] * PROCESSES) for k in local}
  assert np.abs(np.asarray(tower(model, pixels, unshifted)) - alone).max() > 100 * error + 1e-4
