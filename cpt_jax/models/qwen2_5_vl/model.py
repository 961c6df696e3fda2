"""Qwen2.5-VL: vision tower + Qwen2 decoder + LM head, with a jittable decoding API.

Eager use computes every host-side index itself:

    logits = model(input_ids, attention_mask, pixel_values, image_grid_thw)    # [B, S, V] f32

Inside jit, precompute the metadata on the host and pass it in as arrays:

    extra = prepare_inputs(config, input_ids, attention_mask, image_grid_thw)  # numpy
    logits = model(input_ids, attention_mask, pixel_values,
                   position_ids=extra["position_ids"], vision_inputs=extra["vision_inputs"])

Decoding (pure functions of their inputs; jit `prefill` and `decode_step` separately and loop
over `decode_step`, e.g. in a lax.while_loop; the cache is a pytree of arrays):

    cache = model.init_cache(batch, max_len, dtype)            # KVCache, max_len >= S + new tokens
    logits, cache = model.prefill(input_ids, attention_mask, cache, pixel_values=...,
                                  position_ids=..., vision_inputs=...)  # logits [B, V] f32
    logits, cache = model.decode_step(tokens, cache)           # tokens [B, 1] -> [B, V] f32

For n continuations of each prompt, prefill into a cache of S slots and `cache.fork(n, new_tokens)`:
decode steps then take [B * n, 1] tokens and read each prompt's slots once for its n rows.

`prefill` returns the logits of each row's last real token, so prompts may be left- or
right-padded. The cache records each row's next M-RoPE text position (the reference's
"position + rope delta"), which `decode_step` uses and advances; every row writes its new token
into slot `cache.index`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax.kernels import blocked_matmul
from cpt_jax.models.qwen2_5_vl import layers, rope, text, vision
from cpt_jax.models.qwen2_5_vl.config import ModelConfig
from cpt_jax.models.qwen2_5_vl.text import KVCache


def _is_concrete(x) -> bool:
  return x is not None and not isinstance(x, jax.core.Tracer)


def last_real_hidden(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """hidden [B, S, D] -> [B, D] at each row's last real token (any padding side)."""
  real = attention_mask.astype(bool)
  last = real.shape[1] - 1 - jnp.argmax(real[:, ::-1], axis=1)  # [B]
  return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def prepare_inputs(config: ModelConfig, input_ids, attention_mask=None,
                   image_grid_thw=None) -> dict:
  """Host-side (numpy) metadata for jitted callers.

  Returns dict(position_ids [3, B, S] int32, rope_deltas [B, 1] int32,
  vision_inputs: dict of numpy arrays from `prepare_vision_inputs`, or None without images).
  """
  position_ids, rope_deltas = rope.get_rope_index(config, input_ids, attention_mask,
                                                  image_grid_thw)
  vision_inputs = None
  if image_grid_thw is not None and len(np.asarray(image_grid_thw).reshape(-1, 3)):
    if config.vision is None:
      raise ValueError("image_grid_thw given to a text-only config (vision is None)")
    vision_inputs = vision.prepare_vision_inputs(image_grid_thw, config.vision)
  return dict(position_ids=position_ids, rope_deltas=rope_deltas, vision_inputs=vision_inputs)


class Qwen2_5_VL(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration in Flax NNX (text-only Qwen2 when config.vision is None)."""

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    config.validate()
    if config.attention_impl == "cudnn":
      if jax.default_backend() != "gpu":
        raise ValueError(f"attention_impl='cudnn' needs a GPU backend, not "
                         f"{jax.default_backend()!r}; use 'xla'")
      if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"attention_impl='cudnn' needs dtype bfloat16 or float16, not "
                         f"{jnp.dtype(dtype)}")
    self.config = config
    keys = layers.Keys(rngs.params())
    kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys, impl=config.attention_impl,
              remat=config.remat)
    self.visual = (vision.VisionTransformer(config.vision, **kw)
                   if config.vision is not None else None)
    self.language_model = text.Decoder(config.text, causal_blocks=config.causal_blocks, **kw)
    self.lm_head = (None if config.tie_word_embeddings else
                    layers.param(keys, (config.text.hidden_size, config.text.vocab_size),
                                 ("embed", "vocab"), init="normal", dtype=param_dtype))
    self.kernel_layout = "in_out"  # with_kernel_layout

  # ---------------------------------------------------------------- pieces

  def image_features(self, pixel_values, image_grid_thw=None, vision_inputs=None) -> jax.Array:
    """pixel_values [P, C*T*P*P] -> merged image features [P / merge**2, D]."""
    if self.visual is None:
      raise ValueError("pixel_values given to a text-only model (config.vision is None)")
    if vision_inputs is None:
      if not _is_concrete(image_grid_thw):
        raise ValueError("image_grid_thw must be a concrete array outside jit, or pass "
                         "vision_inputs from prepare_inputs / prepare_vision_inputs")
      vision_inputs = vision.prepare_vision_inputs(np.asarray(image_grid_thw), self.config.vision)
    return self.visual(pixel_values, vision_inputs)

  def embed(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
            position_ids=None, vision_inputs=None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Token embeddings with image features in place of `<|image_pad|>` tokens.

    Returns embeddings [B, S, D], attention_mask [B, S] and position_ids [3, B, S].
    """
    cfg = self.config
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    x = self.language_model.embed(input_ids)
    n_tokens = (int(np.sum(np.asarray(input_ids) == cfg.image_token_id))
                if _is_concrete(input_ids) else None)
    if pixel_values is not None:
      if cfg.vision is None:
        raise ValueError("pixel_values given to a text-only model (config.vision is None)")
      n_features = pixel_values.shape[0] // cfg.vision.spatial_merge_size**2
      if n_tokens is not None and n_tokens != n_features:
        raise ValueError(f"image features and <|image_pad|> tokens do not match: "
                         f"{n_tokens} image tokens, {n_features} image features")
      features = self.image_features(pixel_values, image_grid_thw, vision_inputs)  # [N, D]
      is_image = input_ids == cfg.image_token_id  # [B, S]
      # The k-th image token (in row-major order) takes feature k.
      feature_index = jnp.cumsum(is_image.reshape(-1)) - 1
      feature_index = jnp.clip(feature_index, 0, n_features - 1).reshape(is_image.shape)
      x = jnp.where(is_image[..., None], features.astype(x.dtype)[feature_index], x)
    elif n_tokens:
      raise ValueError(f"input_ids hold {n_tokens} <|image_pad|> tokens but no pixel_values")
    if position_ids is None:
      if _is_concrete(input_ids) and _is_concrete(attention_mask):
        grids = None if image_grid_thw is None else np.asarray(image_grid_thw)
        position_ids, _ = rope.get_rope_index(cfg, np.asarray(input_ids),
                                              np.asarray(attention_mask), grids)
      elif pixel_values is None:
        position_ids = rope.text_positions(attention_mask)
      else:
        raise ValueError("inside jit, pass position_ids (from prepare_inputs) with images")
    return x, attention_mask, jnp.asarray(position_ids)

  def head_kernel(self) -> jax.Array:
    """The LM head [D, V] (the embedding table's transpose when the two are tied)."""
    if self.kernel_layout == "blocks":
      raise ValueError("head_kernel: this is a decoding copy with kernels in column blocks "
                       "(with_kernel_layout('blocks')); use the model it was made from")
    if self.lm_head is None:
      return self.language_model.embed_tokens[...].T
    return self.lm_head[...].T if self.kernel_layout == "out_in" else self.lm_head[...]

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final hidden states [..., D] -> float32 logits [..., V]."""
    if self.kernel_layout == "blocks":
      return blocked_matmul.blocked_matmul(hidden, self.lm_head[...],
                                           widths=(self.config.text.vocab_size,))
    if self.kernel_layout == "out_in":
      kernel = self.language_model.embed_tokens if self.lm_head is None else self.lm_head
      return layers.dot_out_in(hidden, kernel[...].astype(hidden.dtype),
                               preferred_element_type=jnp.float32)
    kernel = self.head_kernel().astype(hidden.dtype)
    return jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)

  def with_kernel_layout(self, layout: str) -> Qwen2_5_VL:
    """A copy computing the same function with every dense kernel and the LM head stored in
    `layout` (`layers.KERNEL_LAYOUTS`, `layers.store_kernels`): 'out_in' holds the head as
    [V, D]; 'blocks' (a float32 model, CPU only) holds it, tied or not, as the column blocks of
    [D, V]. This model is untouched and the arrays not rewritten are shared. For decoding
    (cpt_jax.rl.sampler); not for training or saving."""
    if self.kernel_layout != "in_out":
      raise ValueError(f"with_kernel_layout: this model's kernels are already "
                       f"{self.kernel_layout!r}; start from the model they were made from")
    copy = nnx.merge(*nnx.split(self))
    if layout == "in_out":
      return copy
    layers.store_kernels(copy, layout)
    if layout == "blocks":
      head = self.head_kernel()
      copy.lm_head = nnx.data(nnx.Param(blocked_matmul.to_blocks(head)))
    elif copy.lm_head is not None:
      copy.lm_head = copy.lm_head.replace(copy.lm_head[...].T, out_sharding=("vocab", "embed"))
    copy.kernel_layout = layout
    return copy

  # ---------------------------------------------------------------- full forward

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
               position_ids=None, vision_inputs=None) -> jax.Array:
    """input_ids [B, S] -> logits [B, S, V] (float32)."""
    return self.logits(self.hidden_states(
        input_ids, attention_mask, pixel_values, image_grid_thw, position_ids=position_ids,
        vision_inputs=vision_inputs))

  def hidden_states(self, input_ids, attention_mask=None, pixel_values=None,
                    image_grid_thw=None, *, position_ids=None, vision_inputs=None) -> jax.Array:
    """Final-norm hidden states [B, S, D] (same arguments as `__call__`); with `logits` this
    lets a loss project only the positions it needs, or project in chunks."""
    x, attention_mask, position_ids = self.embed(
        input_ids, attention_mask, pixel_values, image_grid_thw, position_ids=position_ids,
        vision_inputs=vision_inputs)
    hidden, _ = self.language_model(x, position_ids, attention_mask)
    return hidden

  # ---------------------------------------------------------------- decoding

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    return text.init_cache(self.config.text, batch, max_len, dtype)

  def prefill(self, input_ids, attention_mask, cache: KVCache, *, pixel_values=None,
              image_grid_thw=None, position_ids=None,
              vision_inputs=None) -> tuple[jax.Array, KVCache]:
    """Writes the prompt [B, S] into the cache at slot `cache.index` (0 for a fresh cache).

    Returns the logits [B, V] (float32) of each row's last real token and the cache, whose
    `positions` now hold each row's next text position.
    """
    x, attention_mask, position_ids = self.embed(
        input_ids, attention_mask, pixel_values, image_grid_thw, position_ids=position_ids,
        vision_inputs=vision_inputs)
    hidden, cache = self.language_model(x, position_ids, attention_mask, cache)
    real = attention_mask.astype(bool)
    last_hidden = last_real_hidden(hidden, attention_mask)
    top = jnp.max(jnp.where(real, position_ids.max(axis=0), -1), axis=1)  # [B]
    positions = jnp.where(real.any(axis=1), top + 1, cache.positions).astype(jnp.int32)
    return self.logits(last_hidden), cache.replace(positions=positions)

  def decode_step(self, tokens, cache: KVCache, *, positions=None) -> tuple[jax.Array, KVCache]:
    """One new token per row: tokens [B, 1] -> logits [B, V] (float32), advanced cache.

    positions [3, B, 1] overrides the cache's next text positions (cache.positions).
    """
    if positions is None:
      positions = jnp.broadcast_to(cache.positions[None, :, None], (3, tokens.shape[0], 1))
    x = self.language_model.embed(tokens)
    hidden, cache = self.language_model(x, positions, jnp.ones(tokens.shape, jnp.int32), cache)
    next_positions = (positions[0, :, -1] + 1).astype(jnp.int32)
    return self.logits(hidden[:, -1]), cache.replace(positions=next_positions)


def init_from_config(config: ModelConfig, rng: jax.Array | int = 0, dtype=jnp.float32,
                     param_dtype=jnp.float32) -> Qwen2_5_VL:
  """A randomly initialised model: normal(0.02) weights, zero biases, unit norm scales.

  Values are drawn on the host with numpy, seeded by `rng` (an int or a JAX key), and the model
  is built abstractly first: no XLA compilation, which on CPU would take longer than the
  tiny models of tests and demos need to run. Large models come from `load_pretrained`, or
  from jitting the constructor with output shardings (cpt_jax.sharding).
  """
  model = nnx.eval_shape(
      lambda: Qwen2_5_VL(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
  seed = rng if isinstance(rng, int) else np.asarray(jax.random.key_data(rng)).ravel().tolist()
  gen = np.random.default_rng(seed)
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape, init = tuple(variable.shape), variable.get_metadata()["init"]
    if init == "normal":
      value = layers.INIT_STDDEV * gen.standard_normal(shape, dtype=np.float32)
    else:
      value = (np.zeros if init == "zeros" else np.ones)(shape, np.float32)
    variable.set_value(jnp.asarray(value, dtype=variable.dtype))
  return model
