import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from cpt_jax.data import image_processing as ip

# Small pixel bounds keep every image tiny: 4 to 16 merged 28x28 cells.
MIN_PIXELS = 28 * 28 * 4
MAX_PIXELS = 28 * 28 * 16


def _random_image(height, width, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
  return Image.fromarray(array[..., 0] if channels == 1 else array, mode=mode)


def _hf(images, min_pixels, max_pixels):
  # A fresh size dict per processor: passing min_pixels= to the constructor mutates the class default.
  processor = Qwen2VLImageProcessorPil(size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
  out = processor(images=images, return_tensors="np")
  return out["pixel_values"], out["image_grid_thw"]


@pytest.mark.parametrize(
    "height, width, factor, min_pixels, max_pixels, expected",
    [
        (100, 150, 28, 56 * 56, 28 * 28 * 1280, (112, 140)),  # plain rounding
        (42, 70, 28, 56 * 56, 28 * 28 * 1280, (56, 56)),  # 1.5 and 2.5 round half to even
        (10, 20, 28, 56 * 56, 28 * 28 * 1280, (56, 84)),  # too small: scale up, ceil
        (1000, 2000, 28, 56 * 56, 28 * 28 * 100, (196, 392)),  # too large: scale down, floor
        (10, 2000, 28, 56 * 56, 28 * 28 * 1280, (28, 812)),  # aspect ratio exactly 200 is allowed
        (28, 5600, 28, 56 * 56, 28 * 28 * 10, (28, 1232)),  # floor clamps to factor, area > max
        (30, 50, 14, 14 * 14, 14 * 14 * 100, (28, 56)),
    ],
)
def test_smart_resize_hand_computed(height, width, factor, min_pixels, max_pixels, expected):
  assert ip.smart_resize(height, width, factor, min_pixels, max_pixels) == expected


def test_smart_resize_errors():
  with pytest.raises(ValueError, match="aspect ratio"):
    ip.smart_resize(10, 2001)
  with pytest.raises(ValueError, match="positive"):
    ip.smart_resize(0, 10)
  with pytest.raises(ValueError, match="min_pixels"):
    ip.smart_resize(100, 100, min_pixels=1000, max_pixels=500)


@pytest.mark.parametrize(
    "height, width, mode",
    [
        (60, 90, "RGB"),  # within bounds: rounding only
        (56, 112, "RGB"),  # already a valid size
        (10, 20, "RGB"),  # below min_pixels
        (300, 200, "RGB"),  # above max_pixels
        (23, 500, "RGB"),  # elongated, both branches of rounding
        (70, 45, "RGBA"),
        (33, 81, "L"),
    ],
)
def test_matches_hf(height, width, mode):
  img = _random_image(height, width, mode, seed=height * width)
  pixel_values, grid_thw = ip.preprocess_image(img, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  hf_pixel_values, hf_grid_thw = _hf([img], MIN_PIXELS, MAX_PIXELS)
  assert pixel_values.dtype == np.float32 and grid_thw.dtype == np.int64
  np.testing.assert_array_equal(grid_thw, hf_grid_thw[0])
  assert pixel_values.shape == hf_pixel_values.shape == (int(np.prod(grid_thw)), 3 * 2 * 14 * 14)
  np.testing.assert_allclose(pixel_values, hf_pixel_values, rtol=0, atol=1e-5)


def test_default_bounds_match_hf():
  img = _random_image(120, 75)
  pixel_values, grid_thw = ip.preprocess_image(img)
  hf_pixel_values, hf_grid_thw = _hf([img], 56 * 56, 28 * 28 * 1280)
  np.testing.assert_array_equal(grid_thw, hf_grid_thw[0])
  np.testing.assert_allclose(pixel_values, hf_pixel_values, rtol=0, atol=1e-5)


def test_palette_image_matches_hf():
  img = _random_image(50, 64).convert("P")
  pixel_values, _ = ip.preprocess_image(img, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  np.testing.assert_allclose(pixel_values, _hf([img], MIN_PIXELS, MAX_PIXELS)[0], rtol=0, atol=1e-5)


def test_batch_matches_hf():
  images = [_random_image(60, 90, seed=1), _random_image(300, 200, seed=2), _random_image(10, 20, seed=3)]
  pixel_values, grid_thw = ip.preprocess_images(images, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  hf_pixel_values, hf_grid_thw = _hf(images, MIN_PIXELS, MAX_PIXELS)
  np.testing.assert_array_equal(grid_thw, hf_grid_thw)
  np.testing.assert_allclose(pixel_values, hf_pixel_values, rtol=0, atol=1e-5)


def test_fixed_size_matches_hf():
  # With min = max = 112 * 140, HF's smart_resize of a 100x150 image lands on exactly (112, 140).
  img = _random_image(100, 150)
  pixel_values, grid_thw = ip.preprocess_image(img, fixed_size=(112, 140))
  hf_pixel_values, hf_grid_thw = _hf([img], 112 * 140, 112 * 140)
  np.testing.assert_array_equal(grid_thw, [1, 8, 10])
  np.testing.assert_array_equal(hf_grid_thw[0], [1, 8, 10])
  np.testing.assert_allclose(pixel_values, hf_pixel_values, rtol=0, atol=1e-5)
  # fixed_size ignores the pixel bounds.
  small, small_thw = ip.preprocess_image(img, fixed_size=(28, 56), max_pixels=MIN_PIXELS)
  assert small.shape == (8, 1176) and list(small_thw) == [1, 2, 4]


def test_numpy_input_equals_pil_input():
  img = _random_image(40, 70, "RGBA")
  kw = dict(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
  expected = ip.preprocess_image(img, **kw)[0]
  np.testing.assert_array_equal(ip.preprocess_image(np.asarray(img), **kw)[0], expected)
  np.testing.assert_array_equal(ip.preprocess_image(np.asarray(img)[..., :3], **kw)[0], expected)
  gray = _random_image(40, 70, "L")
  expected = ip.preprocess_image(gray, **kw)[0]
  np.testing.assert_array_equal(ip.preprocess_image(np.asarray(gray), **kw)[0], expected)
  np.testing.assert_array_equal(ip.preprocess_image(np.asarray(gray)[..., None], **kw)[0], expected)


def test_patch_layout_hand_built():
  # 56x112 image (4x8 patches) where patch (i, j) is constant with value 10 * i + j in every
  # channel; no resize happens, so each row must be that constant, normalized.
  values = 10 * np.arange(4)[:, None] + np.arange(8)[None, :]  # [4, 8]
  array = np.repeat(np.repeat(values, 14, axis=0), 14, axis=1).astype(np.uint8)  # [56, 112]
  pixel_values, grid_thw = ip.preprocess_image(np.stack([array] * 3, axis=-1), fixed_size=(56, 112))
  assert list(grid_thw) == [1, 4, 8]
  # Merge groups of 2x2 patches are contiguous, groups ordered row-major over the 2x4 blocks.
  order = [(bh * 2 + mh, bw * 2 + mw) for bh in range(2) for bw in range(4) for mh in range(2)
           for mw in range(2)]
  mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
  rows = pixel_values.reshape(32, 3, 2 * 14 * 14)  # [N, C, T*P*P]
  for row, (i, j) in enumerate(order):
    expected = (values[i, j] / 255 - mean) / std  # [C]
    np.testing.assert_allclose(rows[row], np.broadcast_to(expected[:, None], (3, 392)), atol=1e-6)


def test_clip_constants_match_transformers():
  assert ip.OPENAI_CLIP_MEAN == tuple(OPENAI_CLIP_MEAN)
  assert ip.OPENAI_CLIP_STD == tuple(OPENAI_CLIP_STD)


def test_bad_input_errors():
  rgb = np.zeros((28, 28, 3), np.uint8)
  with pytest.raises(ValueError, match="empty"):
    ip.preprocess_image(np.zeros((0, 28, 3), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    ip.preprocess_image(rgb.astype(np.float32))
  with pytest.raises(ValueError, match="shape"):
    ip.preprocess_image(np.zeros((28, 28, 5), np.uint8))
  with pytest.raises(ValueError, match="fixed_size"):
    ip.preprocess_image(rgb, fixed_size=(30, 56))
  with pytest.raises(ValueError, match="aspect ratio"):
    ip.preprocess_image(np.zeros((2, 500, 3), np.uint8))
  with pytest.raises(ValueError, match="PIL"):
    ip.preprocess_image([[0]])
  with pytest.raises(ValueError, match="at least one image"):
    ip.preprocess_images([])
