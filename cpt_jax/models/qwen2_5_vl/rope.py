"""Rotary position embeddings: M-RoPE position ids (host, numpy) and the rotations (device).

Text tokens get equal (t, h, w) positions that count up by one. The tokens of an image with
merged grid (t, h, w) get position `start + (i_t, i_h, i_w)`, and the text after it resumes
at `start + max(h, w)`. Channel i of the rotary half uses row 0, 1 or 2 of the positions
according to the contiguous `mrope_section` = (temporal, height, width) split of head_dim / 2.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax.models.qwen2_5_vl.config import ModelConfig


def get_rope_index(
    config: ModelConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """M-RoPE positions of a (left- or right-) padded batch, as transformers computes them.

  Args:
    input_ids: [B, S]; each image appears as t*h*w / merge**2 consecutive `<|image_pad|>` tokens.
    attention_mask: [B, S], 1 for real tokens; padding gets position 0 and is skipped.
    image_grid_thw: [I, 3] patch grids of all images of the batch, in reading order.

  Returns:
    position_ids [3, B, S] int32 and rope_deltas [B, 1] int32, where rope_deltas is
    (largest position + 1) - (number of real tokens): the next generated token of row b sits at
    text position `n_real_tokens_b + rope_deltas_b`.
  """
  input_ids = np.asarray(input_ids)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, S], got shape {input_ids.shape}")
  batch, length = input_ids.shape
  mask = (np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)) != 0
  if mask.shape != input_ids.shape:
    raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}")
  grids = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)
  grids = grids.reshape(-1, 3).astype(np.int64)
  merge = config.vision.spatial_merge_size if config.vision is not None else 1

  position_ids = np.zeros((3, batch, length), np.int32)
  deltas = np.zeros((batch, 1), np.int32)
  next_image = 0
  for b in range(batch):
    ids = input_ids[b][mask[b]]
    is_image = ids == config.image_token_id
    pos = np.zeros((3, len(ids)), np.int64)
    start, i = 0, 0  # next position value, next token
    while i < len(ids):
      if not is_image[i]:
        # A run of text tokens.
        j = i + 1
        while j < len(ids) and not is_image[j]:
          j += 1
        pos[:, i:j] = start + np.arange(j - i)
        start += j - i
        i = j
        continue
      if next_image >= len(grids):
        raise ValueError(
            f"row {b} has more images than image_grid_thw provides ({len(grids)} grids)")
      t, h, w = grids[next_image] // np.array([1, merge, merge])
      next_image += 1
      n = int(t * h * w)
      if i + n > len(ids) or not is_image[i:i + n].all():
        raise ValueError(
            f"row {b}: image {next_image - 1} with merged grid {(int(t), int(h), int(w))} needs "
            f"{n} consecutive image tokens, found {int(is_image[i:i + n].sum())}")
      tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
      pos[:, i:i + n] = start + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
      # As transformers 5 does; older versions used max(t, h, w), the same for images (t = 1).
      start += int(max(h, w))
      i += n
    position_ids[:, b, mask[b]] = pos
    deltas[b, 0] = (pos.max() + 1 - len(ids)) if len(ids) else 0
  if next_image != len(grids):
    raise ValueError(
        f"image_grid_thw has {len(grids)} grids but the batch has image tokens for {next_image}")
  return position_ids, deltas


def text_positions(attention_mask: jax.Array) -> jax.Array:
  """[B, S] mask -> [3, B, S] positions of a batch without images (pads get 0); jittable."""
  pos = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
  return jnp.broadcast_to(pos, (3, *pos.shape))


def inverse_frequencies(dim: int, theta: float) -> np.ndarray:
  """theta^(-2i/dim) for i < dim/2, in float32 exactly as the reference computes it."""
  return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))).astype(np.float32)


def mrope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float,
                  mrope_section: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """[3, B, S] positions -> cos, sin [B, S, head_dim] (float32) with sectioned channels."""
  inv_freq = inverse_frequencies(head_dim, theta)  # [D/2]
  # Channel c of the rotary half takes its angle from position row section_of[c].
  section_of = np.repeat(np.arange(3), mrope_section)  # [D/2]
  pos = jnp.moveaxis(position_ids[section_of], 0, -1).astype(jnp.float32)  # [B, S, D/2]
  freqs = pos * inv_freq
  return cos_sin(freqs)


def cos_sin(freqs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rotate-half layout: angles [..., D/2] -> cos, sin [..., D]."""
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Applies rotate-half RoPE in float32; x [..., S, N, D], cos/sin [..., S, D]."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  cos, sin = cos[..., None, :], sin[..., None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(dtype)
