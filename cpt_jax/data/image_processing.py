"""Qwen2.5-VL image preprocessing in numpy + PIL, matching HF `Qwen2VLImageProcessorPil`.

Steps per image (same as HF's PIL backend): convert to RGB, bicubic resize with PIL to a size
from `smart_resize` (or to `fixed_size`), rescale by 1/255, normalize with the OpenAI CLIP
mean/std, repeat the still frame `temporal_patch_size` times, and cut into patches laid out as
HF does: rows ordered (block_h, block_w, merge_h, merge_w) so each merge x merge group of patches
is contiguous, each row flattened as (channel, time, patch_h, patch_w).

Rescale and normalize are one lookup table from uint8 to float32, computed with HF's exact
arithmetic (float64 rescale, float32 cast, float32 normalize), so the result is bit-identical.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200
RESCALE_FACTOR = 1 / 255
# OpenAI CLIP normalization (transformers.image_utils.OPENAI_CLIP_MEAN/STD; that module imports torch).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
  """Returns (h, w), multiples of `factor`, near the input aspect ratio, area in [min, max] pixels.

  Same rounding as HF: round each side to the nearest multiple (half to even); if the area is
  too large, scale both sides down and floor (never below `factor`); if too small, scale up and
  ceil. Like HF, very elongated images may still end outside [min_pixels, max_pixels].
  """
  if height <= 0 or width <= 0:
    raise ValueError(f"image height and width must be positive, got height={height}, width={width}")
  if min_pixels <= 0 or max_pixels < min_pixels:
    raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels}, "
                     f"max_pixels={max_pixels}")
  aspect_ratio = max(height, width) / min(height, width)
  if aspect_ratio > MAX_ASPECT_RATIO:
    raise ValueError(f"absolute aspect ratio must be at most {MAX_ASPECT_RATIO}, got {aspect_ratio} "
                     f"for height={height}, width={width}")
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def _normalize_lut() -> np.ndarray:
  """[3, 256] float32: normalized value of each uint8 level per channel, in HF's arithmetic."""
  levels = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)  # [256]
  mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)[:, None]  # [3, 1]
  std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)[:, None]
  return (levels[None, :] - mean) / std


_LUT = _normalize_lut()


def _to_rgb_pil(img: Image.Image | np.ndarray) -> Image.Image:
  """PIL image in RGB mode; numpy input must be uint8 [H, W], [H, W, 1|3|4]."""
  if isinstance(img, np.ndarray):
    if img.dtype != np.uint8:
      raise ValueError(f"numpy image must be uint8 (HWC), got dtype {img.dtype}")
    if img.ndim == 3 and img.shape[-1] == 1:
      img = img[..., 0]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (3, 4))):
      raise ValueError(f"numpy image must be [H, W] or [H, W, C] with C in (1, 3, 4), got shape "
                       f"{img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
      raise ValueError(f"image is empty, shape {img.shape}")
    img = Image.fromarray(np.ascontiguousarray(img))
  elif not isinstance(img, Image.Image):
    raise ValueError(f"image must be a PIL.Image.Image or a uint8 numpy array, got {type(img)}")
  if img.width == 0 or img.height == 0:
    raise ValueError(f"image is empty, size (w, h) = {img.size}")
  # Like HF: plain mode conversion, so RGBA drops alpha without compositing.
  return img if img.mode == "RGB" else img.convert("RGB")


def preprocess_image(
    img: Image.Image | np.ndarray,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    fixed_size: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Preprocesses one still image for the Qwen2.5-VL vision tower.

  Args:
    img: PIL image (any mode convertible to RGB) or uint8 numpy array [H, W] or [H, W, C].
    min_pixels, max_pixels: area bounds for `smart_resize`; ignored when `fixed_size` is set.
    patch_size, temporal_patch_size, merge_size: vision tower geometry.
    fixed_size: (H, W), multiples of patch_size * merge_size; resize to exactly this size
      (static shapes under jit) instead of `smart_resize`.

  Returns:
    pixel_values: float32 [grid_t * grid_h * grid_w, 3 * temporal_patch_size * patch_size**2].
    grid_thw: int64 [3] = (1, grid_h, grid_w), in patches.
  """
  factor = patch_size * merge_size
  rgb = _to_rgb_pil(img)
  if fixed_size is None:
    height, width = smart_resize(rgb.height, rgb.width, factor, min_pixels, max_pixels)
  else:
    height, width = (int(s) for s in fixed_size)
    if height <= 0 or width <= 0 or height % factor or width % factor:
      raise ValueError(f"fixed_size must be positive multiples of patch_size * merge_size = "
                       f"{factor}, got {tuple(fixed_size)}")
  # HF resizes even to the same size; PIL then returns an unchanged copy.
  pixels = np.asarray(rgb.resize((width, height), resample=Image.Resampling.BICUBIC))  # [H, W, 3]

  grid_h, grid_w = height // patch_size, width // patch_size
  blocks_h, blocks_w = grid_h // merge_size, grid_w // merge_size
  channels = pixels.shape[-1]
  # [bh, mh, ph, bw, mw, pw, C] -> [bh, bw, mh, mw, C, ph, pw], on uint8 to move 4x less data.
  patches = pixels.reshape(blocks_h, merge_size, patch_size, blocks_w, merge_size, patch_size,
                           channels).transpose(0, 3, 1, 4, 6, 2, 5)
  patches = np.ascontiguousarray(patches)
  out = np.empty((blocks_h, blocks_w, merge_size, merge_size, channels, temporal_patch_size,
                  patch_size, patch_size), np.float32)
  for c in range(channels):
    # Normalize through the lookup table, then repeat the frame over time by broadcasting.
    out[:, :, :, :, c] = np.take(_LUT[c], patches[:, :, :, :, c])[:, :, :, :, None]
  pixel_values = out.reshape(grid_h * grid_w, channels * temporal_patch_size * patch_size**2)
  return pixel_values, np.array([1, grid_h, grid_w], dtype=np.int64)


def preprocess_images(
    images: Sequence[Image.Image | np.ndarray], **kwargs
) -> tuple[np.ndarray, np.ndarray]:
  """Preprocesses several images; returns (pixel_values concatenated over images, grid_thw [I, 3])."""
  if len(images) == 0:
    raise ValueError("preprocess_images needs at least one image, got none")
  results = [preprocess_image(img, **kwargs) for img in images]
  pixel_values = np.concatenate([pv for pv, _ in results], axis=0)
  grid_thw = np.stack([thw for _, thw in results])
  return pixel_values, grid_thw
