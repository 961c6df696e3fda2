"""A tiny 2-layer attention + MLP decoder whose params and activations carry logical names.

Shared by tests/test_sharding.py and tests/_distributed_worker.py (stands in for the real
model in sharding tests: GQA with 2 KV heads, so tensor=4 must replicate them).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  vocab: int = 64
  embed: int = 32
  heads: int = 4
  kv_heads: int = 2
  head_dim: int = 8
  mlp: int = 64
  layers: int = 2


def _param(rng: np.random.Generator, shape, names) -> nnx.Param:
  # Host numpy init: jitting many jax.random calls costs far more compile time than the tests.
  return nnx.Param(jnp.asarray(0.1 * rng.standard_normal(shape), jnp.float32), out_sharding=names)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int):
    self.scale = nnx.Param(jnp.ones((dim,)), out_sharding=("norm",))

  def __call__(self, x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * self.scale[...]


class Attention(nnx.Module):
  def __init__(self, cfg: ToyConfig, rng: np.random.Generator):
    self.cfg = cfg
    self.q = _param(rng, (cfg.embed, cfg.heads, cfg.head_dim), ("embed", "heads", "head_dim"))
    self.k = _param(rng, (cfg.embed, cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"))
    self.v = _param(rng, (cfg.embed, cfg.kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"))
    self.o = _param(rng, (cfg.heads, cfg.head_dim, cfg.embed), ("heads", "head_dim", "embed"))

  def __call__(self, x):  # [B, S, E]
    cfg = self.cfg
    q = constrain(jnp.einsum("bse,ehd->bshd", x, self.q[...]), ("batch", "length", "heads", "head_dim"))
    k = constrain(jnp.einsum("bse,ehd->bshd", x, self.k[...]), ("batch", "length", "kv_heads", "head_dim"))
    v = jnp.einsum("bse,ehd->bshd", x, self.v[...])
    k = jnp.repeat(k, cfg.heads // cfg.kv_heads, axis=2)  # [B, S, H, D]
    v = jnp.repeat(v, cfg.heads // cfg.kv_heads, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(cfg.head_dim)
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    probs = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return constrain(jnp.einsum("bshd,hde->bse", out, self.o[...]), ("batch", "length", "embed"))


class Block(nnx.Module):
  def __init__(self, cfg: ToyConfig, rng: np.random.Generator):
    self.attn_norm = RMSNorm(cfg.embed)
    self.attn = Attention(cfg, rng)
    self.mlp_norm = RMSNorm(cfg.embed)
    self.up = _param(rng, (cfg.embed, cfg.mlp), ("embed", "mlp"))
    self.down = _param(rng, (cfg.mlp, cfg.embed), ("mlp", "embed"))

  def __call__(self, x):  # [B, S, E]
    x = x + self.attn(self.attn_norm(x))
    h = constrain(jax.nn.gelu(self.mlp_norm(x) @ self.up[...]), ("batch", "length", "mlp"))
    return x + h @ self.down[...]


class ToyDecoder(nnx.Module):
  def __init__(self, cfg: ToyConfig, rng: np.random.Generator):
    self.embed = _param(rng, (cfg.vocab, cfg.embed), ("vocab", "embed"))
    self.blocks = nnx.List([Block(cfg, rng) for _ in range(cfg.layers)])
    self.norm = RMSNorm(cfg.embed)
    self.lm_head = _param(rng, (cfg.embed, cfg.vocab), ("embed", "vocab"))

  def __call__(self, input_ids):  # [B, S] -> [B, S, V]
    x = constrain(self.embed[...][input_ids], ("batch", "length", "embed"))
    for block in self.blocks:
      x = block(x)
    return constrain(self.norm(x) @ self.lm_head[...], ("batch", "length", "vocab"))


def make_toy(cfg: ToyConfig = ToyConfig(), seed: int = 0) -> ToyDecoder:
  return ToyDecoder(cfg, np.random.default_rng(seed))


def toy_input_ids(batch: int, length: int, cfg: ToyConfig = ToyConfig(), seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, cfg.vocab, (batch, length), dtype=np.int32)
