"""Qwen2 decoder with M-RoPE and a fixed-size KV cache.

Layers: RMSNorm -> GQA attention (bias on q/k/v only) -> residual -> RMSNorm -> SwiGLU -> residual.
The cache has static shapes: every layer keeps k [B, K, D, T] and v [B, K, T, D] for
T = max_len slots (the layouts attention's two matmuls read, so a decode step copies no cache;
see `layers.attention`), and a chunk of S tokens is written at slot `index` with
dynamic_update_slice. A query attends to the slots that hold real tokens (`mask`) up to its own
slot, so prefill, chunked prefill and one-token decoding are the same computation.

`KVCache.fork` turns a cache of B prompts into one of B * n rows that share it: each row writes
its own slots and reads its prompt's slots as a read-only `SharedPrefix`, so n samples of a
prompt neither copy its keys and values n times nor read them n times per decode step.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from cpt_jax import sharding
from cpt_jax.kernels import blocked_matmul
from cpt_jax.models.qwen2_5_vl import layers, rope
from cpt_jax.models.qwen2_5_vl.config import TextConfig


@flax.struct.dataclass
class SharedPrefix:
  """Read-only keys/values of B prompts, each the prefix of R / B consecutive cache rows."""
  k: tuple[jax.Array, ...]  # per layer [B, K, D, P]
  v: tuple[jax.Array, ...]  # per layer [B, K, P, D]
  mask: jax.Array  # [B, P] int32: 1 where a slot holds a real token


@flax.struct.dataclass
class KVCache:
  """Per-layer keys/values of a batch, a pytree of arrays (jit, lax.while_loop, donation).

  Writes past `max_len` are clamped by dynamic_update_slice and overwrite the last slots, so
  callers size the cache for prompt + generated tokens.
  """
  k: tuple[jax.Array, ...]  # per layer [B, K, D, T]
  v: tuple[jax.Array, ...]  # per layer [B, K, T, D]
  mask: jax.Array  # [B, T] int32: 1 where a slot holds a real (non-padding) token
  index: jax.Array  # [] int32: next slot to write
  positions: jax.Array  # [B] int32: M-RoPE text position of the next generated token
  prefix: SharedPrefix | None = None  # slots every row sees before its own (`fork`)

  @property
  def max_len(self) -> int:
    return self.mask.shape[1]

  def grow(self, max_len: int) -> KVCache:
    """The same cache with empty slots appended up to `max_len` (the cache itself when it
    already has that many). Attention reads every slot, so a cache sized to what has been
    written so far decodes faster than one sized for the longest response."""
    extra = max_len - self.max_len
    if extra < 0:
      raise ValueError(f"cannot shrink a KV cache of {self.max_len} slots to {max_len}")
    if extra == 0:
      return self
    pad = lambda x, axis: jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])
    k = tuple(sharding.constrain(pad(x, 3), ("batch", "kv_heads", "head_dim", "length"))
              for x in self.k)
    v = tuple(sharding.constrain(pad(x, 2), ("batch", "kv_heads", "length", "head_dim"))
              for x in self.v)
    return self.replace(k=k, v=v, mask=pad(self.mask, 1))

  def fork(self, n: int, max_len: int) -> KVCache:
    """A cache of B * n rows, row i * n + j continuing row i of this one, with `max_len` empty
    slots of its own: this cache's written slots become their shared, read-only prefix."""
    if self.prefix is not None:
      raise ValueError("fork: this cache already has a shared prefix")
    if n < 1 or max_len < 0:
      raise ValueError(f"fork: n must be >= 1 and max_len >= 0, got {n} and {max_len}")
    rows, (_, kv_heads, head_dim, _) = self.mask.shape[0] * n, self.k[0].shape
    zeros = lambda shape, axes: tuple(
        sharding.constrain(jnp.zeros(shape, x.dtype), axes) for x in self.k)
    return KVCache(
        k=zeros((rows, kv_heads, head_dim, max_len), ("batch", "kv_heads", "head_dim", "length")),
        v=zeros((rows, kv_heads, max_len, head_dim), ("batch", "kv_heads", "length", "head_dim")),
        mask=jnp.zeros((rows, max_len), jnp.int32), index=jnp.zeros((), jnp.int32),
        positions=jnp.repeat(self.positions, n, axis=0),
        prefix=SharedPrefix(k=self.k, v=self.v, mask=self.mask))


def init_cache(config: TextConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
  """An empty cache of `max_len` slots (k/v in `dtype`)."""
  kv, hd = config.num_kv_heads, config.head_dim
  zeros = lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(k=zeros((batch, kv, hd, max_len)), v=zeros((batch, kv, max_len, hd)),
                 mask=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32),
                 positions=jnp.zeros((batch,), jnp.int32))


class Attention(nnx.Module):

  def __init__(self, config: TextConfig, *, dtype, param_dtype, keys: layers.Keys, impl: str,
               causal_blocks: int):
    d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys)
    self.q_proj = layers.Linear((d,), (h, hd), ("embed", "heads", "head_dim"), bias=True, **kw)
    self.k_proj = layers.Linear((d,), (k, hd), ("embed", "kv_heads", "head_dim"), bias=True, **kw)
    self.v_proj = layers.Linear((d,), (k, hd), ("embed", "kv_heads", "head_dim"), bias=True, **kw)
    self.o_proj = layers.Linear((h, hd), (d,), ("heads", "head_dim", "embed"), bias=False, **kw)
    self.impl = impl
    self.causal_blocks = causal_blocks

  def qkv(self, x):
    """q [B, S, H, hd], k and v [B, S, K, hd] from one matmul: each KV head's query group, key
    and value side by side ([D, K, G + 2, hd], G = H / K), the layout tensor parallelism splits
    (out_in kernels: [K, G + 2, hd, D]; blocks: q, k and v side by side)."""
    proj = (self.q_proj, self.k_proj, self.v_proj)
    layout = self.q_proj.kernel_layout
    h, hd = self.q_proj.out_shape
    kv_heads = self.k_proj.out_shape[0]
    dtype = self.q_proj.dtype
    x = x.astype(dtype)
    b, s = x.shape[:2]
    if layout == "blocks":
      y = blocked_matmul.blocked_matmul(
          x, *(p.kernel[...] for p in proj), widths=(h * hd, kv_heads * hd, kv_heads * hd))
      y = y + jnp.concatenate([p.bias[...].reshape(-1) for p in proj]).astype(dtype)
      q, k, v = jnp.split(y, (h * hd, (h + kv_heads) * hd), axis=-1)
      return (q.reshape(b, s, h, hd), k.reshape(b, s, kv_heads, hd),
              v.reshape(b, s, kv_heads, hd))
    bias = jnp.concatenate([p.bias[...].reshape(kv_heads, -1, hd) for p in proj], axis=1)
    if layout == "out_in":
      kernel = jnp.concatenate([p.kernel[...].reshape(kv_heads, -1, hd, x.shape[-1])
                                for p in proj], axis=1)
      y = layers.dot_out_in(x, kernel.reshape(-1, x.shape[-1]).astype(dtype))
      y = y.reshape(*x.shape[:2], kv_heads, -1, hd)
    else:
      kernel = jnp.concatenate([p.kernel[...].reshape(x.shape[-1], kv_heads, -1, hd)
                                for p in proj], axis=2)
      y = jax.lax.dot_general(x, kernel.astype(dtype), (((2,), (0,)), ((), ())))
    y = y + bias.astype(dtype)  # [B, S, K, G + 2, hd]
    g = h // kv_heads
    return y[:, :, :, :g].reshape(b, s, h, hd), y[:, :, :, g], y[:, :, :, g + 1]

  def __call__(self, x, cos, sin, mask, kv=None, index=None, prefix=None):
    """x [B, S, D]; mask [B, S, T]; kv: this layer's cache (k, v) or None (T = S); prefix: this
    layer's shared (k, v) and its mask [B', P] (`SharedPrefix`) or None."""
    q, k, v = self.qkv(x)
    q = rope.rotate(q, cos, sin)  # [B, S, H, hd]
    k = rope.rotate(k, cos, sin)  # [B, S, K, hd]
    k, v = layers.key_layout(k), layers.value_layout(v)
    if kv is not None:
      k_cache, v_cache = kv
      k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, 0, index))
      v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, index, 0))
      k = sharding.constrain(k, ("batch", "kv_heads", "head_dim", "length"))
      v = sharding.constrain(v, ("batch", "kv_heads", "length", "head_dim"))
      kv = (k, v)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    if prefix is None and k.shape[-1] == q.shape[1]:
      # The Decoder's causal mask over the S inputs (without a cache, or with one that these S
      # tokens fill from slot 0).
      out = layers.causal_attention(q, k, v, mask, blocks=self.causal_blocks, impl=self.impl)
    elif prefix is not None:
      out = layers.prefix_attention(q, k, v, mask, *prefix, impl=self.impl,
                                    blocks=self.causal_blocks)
    else:
      out = layers.attention(q, k, v, mask=mask, impl=self.impl)
    return self.o_proj(out), kv


class DecoderLayer(nnx.Module):

  def __init__(self, config: TextConfig, *, dtype, param_dtype, keys: layers.Keys, impl: str,
               causal_blocks: int):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
    self.self_attn = Attention(config, keys=keys, impl=impl, causal_blocks=causal_blocks, **kw)
    self.post_attention_layernorm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
    self.mlp = layers.GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                               bias=False, keys=keys, **kw)

  def __call__(self, x, cos, sin, mask, kv=None, index=None, prefix=None):
    h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, index, prefix)
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return sharding.constrain(x, ("batch", "length", "embed")), kv


class Decoder(nnx.Module):
  """Token embedding, decoder layers and final norm (the `model.*` / `language_model.*` part)."""

  def __init__(self, config: TextConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               keys: layers.Keys, impl: str = "xla", remat: str = "none",
               causal_blocks: int = 1):
    self.config = config
    self.dtype = dtype
    self.embed_tokens = layers.param(keys, (config.vocab_size, config.hidden_size),
                                     ("vocab", "embed"), init="normal", dtype=param_dtype)
    kw = dict(dtype=dtype, param_dtype=param_dtype, keys=keys, impl=impl,
              causal_blocks=causal_blocks)
    self.layers = nnx.List([DecoderLayer(config, **kw) for _ in range(config.num_layers)])
    self.norm = layers.RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype,
                               param_dtype=param_dtype)
    self.remat = remat

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, S] ids -> [B, S, D] embeddings."""
    return jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)

  def __call__(self, x: jax.Array, position_ids: jax.Array, attention_mask: jax.Array,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """x [B, S, D] embeddings, position_ids [3, B, S], attention_mask [B, S] (1 = real token).

    Without a cache, attention is causal over the S inputs. With a cache, the S tokens are
    written at slots [index, index + S) and attend to every earlier real slot (after the real
    slots of the cache's shared prefix, if any).
    Returns the final-norm hidden states [B, S, D] and the updated cache (or None).
    """
    cfg = self.config
    s = x.shape[1]
    cos, sin = rope.mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section)
    if cache is None:
      causal = jnp.tril(jnp.ones((s, s), bool))
      mask = causal[None] & attention_mask.astype(bool)[:, None, :]  # [B, S, S]
    else:
      slot_mask = jax.lax.dynamic_update_slice(cache.mask, attention_mask.astype(jnp.int32),
                                               (0, cache.index))
      query_slot = cache.index + jnp.arange(s)  # [S]
      causal = jnp.arange(cache.max_len)[None, :] <= query_slot[:, None]  # [S, T]
      mask = causal[None] & slot_mask.astype(bool)[:, None, :]  # [B, S, T]
      prefix = cache.prefix
    x = sharding.constrain(x, ("batch", "length", "embed"))
    call = lambda lyr, *a: lyr(*a)
    if self.remat != "none":  # (without differentiation, remat changes nothing)
      call = nnx.remat(call, policy=layers.remat_policy(self.remat))
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      if cache is not None:
        shared = None if prefix is None else (prefix.k[i], prefix.v[i], prefix.mask)
        x, (k, v) = call(layer, x, cos, sin, mask, (cache.k[i], cache.v[i]), cache.index, shared)
        new_k.append(k)
        new_v.append(v)
      else:
        x, _ = call(layer, x, cos, sin, mask)
    x = self.norm(x)
    if cache is not None:
      cache = cache.replace(k=tuple(new_k), v=tuple(new_v), mask=slot_mask,
                            index=cache.index + s)
    return x, cache
