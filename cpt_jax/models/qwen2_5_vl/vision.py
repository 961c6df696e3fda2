"""Qwen2.5-VL vision tower: patch embedding, window/full attention blocks, patch merger.

The reference reorders patches into window order, runs variable-length attention over
windows (or, in `fullatt_block_indexes`, over whole frames) and restores the original order
after the merger. Here all of that index math happens once on the host
(`prepare_vision_inputs`): each attention layout becomes a padded block table
`gather [N, L]` (patch ids of segment n, in the reference's window order), `lengths [N]` and
its inverse `scatter [P]`. Inside jit, a layer gathers its blocks, attends within each block
with a key-length mask, and scatters back. Attention never crosses a window, a frame or an
image, memory is sum(L^2) rather than P^2, and the patch order outside attention stays the
original one, so the merger needs no inverse permutation.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax.models.qwen2_5_vl import layers, rope
from cpt_jax.models.qwen2_5_vl.config import VisionConfig

ROTARY_THETA = 10000.0


# ------------------------------------------------------------------ host-side index math

def _check_grids(image_grid_thw, config: VisionConfig) -> np.ndarray:
  grids = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
  m = config.spatial_merge_size
  bad = [g.tolist() for g in grids if g[0] < 1 or g[1] % m or g[2] % m or min(g) < 1]
  if bad:
    raise ValueError(f"image grids {bad} must have t >= 1 and h, w positive multiples of "
                     f"spatial_merge_size {m}")
  return grids


def _window_order(grids: np.ndarray, config: VisionConfig) -> tuple[np.ndarray, list[int]]:
  """Merged-unit ids in the reference's window order, and the window sizes (in units)."""
  m = config.spatial_merge_size
  win = config.window_size // m // config.patch_size  # window side in merged units
  order, sizes, offset = [], [], 0
  for t, h, w in grids:
    gh, gw = h // m, w // m
    units = np.arange(t * gh * gw).reshape(t, gh, gw)
    nh, nw = -(-gh // win), -(-gw // win)
    padded = np.full((t, nh * win, nw * win), -1)
    padded[:, :gh, :gw] = units
    windows = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t * nh * nw, -1)
    for window in windows:
      ids = window[window >= 0]
      if len(ids):
        order.append(ids + offset)
        sizes.append(len(ids))
    offset += t * gh * gw
  return np.concatenate(order), sizes


def _blocks(order: np.ndarray, sizes: list[int]) -> dict[str, np.ndarray]:
  """Packs consecutive segments of `order` (patch ids) into a padded [N, L] gather table."""
  n, length = len(sizes), max(sizes)
  gather = np.zeros((n, length), np.int32)  # padding slots read patch 0 and are masked
  scatter = np.zeros(len(order), np.int32)
  start = 0
  for i, size in enumerate(sizes):
    ids = order[start:start + size]
    gather[i, :size] = ids
    scatter[ids] = i * length + np.arange(size)
    start += size
  return dict(gather=gather, lengths=np.asarray(sizes, np.int32), scatter=scatter)


def prepare_vision_inputs(image_grid_thw, config: VisionConfig) -> dict[str, np.ndarray]:
  """Host-side metadata for `VisionTransformer` from patch grids [I, 3] (t, h, w).

  Returns numpy arrays (P = total patches):
    rotary_ids [P, 2]: (row, column) of each patch in its image, for the 2-D rotary;
    window_gather [Nw, Lw], window_lengths [Nw], window_scatter [P]: window attention blocks;
    full_gather [Nf, Lf], full_lengths [Nf], full_scatter [P]: one block per frame.
  """
  grids = _check_grids(image_grid_thw, config)
  m = config.spatial_merge_size
  unit = m * m
  rotary = []
  for t, h, w in grids:
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # Patches come merge-block-major: each m x m block of the grid is contiguous.
    block_major = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()
    rc = np.stack([block_major(rows), block_major(cols)], axis=-1)
    rotary.append(np.tile(rc, (t, 1)))
  unit_order, window_units = _window_order(grids, config)
  patch_order = (unit_order[:, None] * unit + np.arange(unit)).ravel()
  window = _blocks(patch_order, [s * unit for s in window_units])
  # The reference's full attention runs on the window-ordered sequence, one segment per frame.
  frames = [int(h * w) for t, h, w in grids for _ in range(t)]
  full = _blocks(patch_order, frames)
  out = dict(rotary_ids=np.concatenate(rotary).astype(np.int32))
  out.update({f"window_{k}": v for k, v in window.items()})
  out.update({f"full_{k}": v for k, v in full.items()})
  return out


def shift_vision_inputs(inputs: dict[str, np.ndarray], *, patches: int, window_slots: int,
                        full_slots: int) -> dict[str, np.ndarray]:
  """`prepare_vision_inputs` of images that follow others in a concatenated batch (a process's
  images after those of the processes before it): gather tables index patches, so they move by
  the `patches` before; scatters index block slots (blocks x block length), so they move by the
  `window_slots` / `full_slots` before. Concatenating the shifted inputs of all parts along
  their first dims gives the inputs of the whole batch (for parts of equal block lengths)."""
  out = dict(inputs)
  for name, slots in (("window", window_slots), ("full", full_slots)):
    out[f"{name}_gather"] = inputs[f"{name}_gather"] + np.int32(patches)
    out[f"{name}_scatter"] = inputs[f"{name}_scatter"] + np.int32(slots)
  return out


def vision_slots(inputs: dict[str, np.ndarray]) -> tuple[int, int, int]:
  """(patches, window block slots, full block slots) that `inputs` span."""
  return (len(inputs["rotary_ids"]), inputs["window_gather"].size, inputs["full_gather"].size)


# ------------------------------------------------------------------ modules

class VisionAttention(nnx.Module):

  def __init__(self, config: VisionConfig, *, dtype, param_dtype, keys: layers.Keys, impl: str):
    h, d, e = config.num_heads, config.head_dim, config.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
    # Output rows of the reference's fused qkv are ordered (q|k|v, head, head_dim).
    self.qkv = layers.Linear((e,), (3, h, d), ("embed", None, "heads", "head_dim"),
                            bias=True, **kw)
    self.proj = layers.Linear((h, d), (e,), ("heads", "head_dim", "embed"), bias=True, **kw)
    self.impl = impl

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               blocks: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    gather, lengths, scatter = blocks  # [N, L], [N], [P]
    qkv = self.qkv(x)  # [P, 3, H, D]
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
    out = layers.attention(q[gather], layers.key_layout(k[gather]),
                           layers.value_layout(v[gather]), kv_lengths=lengths,
                           impl=self.impl)  # [N, L, H, D]
    out = out.reshape(-1, *out.shape[2:])[scatter]  # [P, H, D]
    return self.proj(out)


class VisionBlock(nnx.Module):

  def __init__(self, config: VisionConfig, *, dtype, param_dtype, keys: layers.Keys, impl: str):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
    self.norm2 = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
    self.attn = VisionAttention(config, keys=keys, impl=impl, **kw)
    self.mlp = layers.GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                               bias=True, keys=keys, **kw)

  def __call__(self, x, cos, sin, blocks):
    x = x + self.attn(self.norm1(x), cos, sin, blocks)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm, concatenate each merge x merge block of patches, Linear, exact GELU, Linear."""

  def __init__(self, config: VisionConfig, *, dtype, param_dtype, keys: layers.Keys):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    merged = config.hidden_size * config.spatial_merge_size**2
    self.merged = merged
    self.ln_q = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
    self.fc1 = layers.Linear((merged,), (merged,), ("embed", "mlp"), bias=True, keys=keys, **kw)
    self.fc2 = layers.Linear((merged,), (config.out_hidden_size,), ("mlp", "embed"), bias=True,
                             keys=keys, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.ln_q(x).reshape(-1, self.merged)
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTransformer(nnx.Module):
  """pixel_values [P, C*T*P*P] (HF layout) -> image features [P / merge**2, out_hidden_size]."""

  def __init__(self, config: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               keys: layers.Keys, impl: str = "xla", remat: str = "none"):
    self.config = config
    kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
    # The stride == kernel Conv3d is a matmul over each flattened (C, T, P, P) patch.
    self.patch_embed = layers.Linear((config.patch_dim,), (config.hidden_size,),
                                     (None, "embed"), bias=False, **kw)
    self.blocks = nnx.List([VisionBlock(config, impl=impl, **kw) for _ in range(config.depth)])
    self.merger = PatchMerger(config, **kw)
    self.remat = remat

  def __call__(self, pixel_values: jax.Array, inputs: dict[str, jax.Array]) -> jax.Array:
    cfg = self.config
    if pixel_values.shape[-1] != cfg.patch_dim:
      raise ValueError(f"pixel_values last dim {pixel_values.shape[-1]} != C*T*P*P = "
                       f"{cfg.patch_dim}")
    if pixel_values.shape[0] != inputs["rotary_ids"].shape[0]:
      raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches but the image grids "
                       f"describe {inputs['rotary_ids'].shape[0]}")
    x = self.patch_embed(pixel_values)  # [P, E]
    inv_freq = rope.inverse_frequencies(cfg.head_dim // 2, ROTARY_THETA)  # [D/4]
    freqs = inputs["rotary_ids"][..., None].astype(jnp.float32) * inv_freq  # [P, 2, D/4]
    cos, sin = rope.cos_sin(freqs.reshape(freqs.shape[0], -1))  # [P, D]
    window = (inputs["window_gather"], inputs["window_lengths"], inputs["window_scatter"])
    full = (inputs["full_gather"], inputs["full_lengths"], inputs["full_scatter"])
    for i, block in enumerate(self.blocks):
      blocks = full if i in cfg.fullatt_block_indexes else window
      if self.remat == "none":
        x = block(x, cos, sin, blocks)
      else:
        x = nnx.remat(lambda blk, *a: blk(*a), policy=layers.remat_policy(self.remat))(
            block, x, cos, sin, blocks)
    return self.merger(x)
