"""Training-side hooks: rematerialisation keeps gradients, the fused-attention path's plumbing."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cpt_jax.models import ModelConfig, init_from_config, prepare_inputs
from cpt_jax.models.qwen2_5_vl import layers
from cpt_jax.train import rft


def test_jax_nn_attention_path_matches_einsum_path():
  rng = np.random.default_rng(0)
  q = rng.standard_normal((2, 5, 4, 8), dtype=np.float32)  # 4 query heads
  k, v = (rng.standard_normal((2, 7, 2, 8), dtype=np.float32) for _ in range(2))  # 2 KV heads
  # Row 1 is left-padded by two slots; queries sit at slots 2..6 (a cache-like offset).
  real = np.ones((2, 7), bool)
  real[1, :2] = False
  mask = (np.arange(7)[None, :] <= np.arange(2, 7)[:, None])[None] & real[:, None, :]
  lengths = np.asarray([7, 4], np.int32)
  for kwargs in (dict(mask=mask), dict(kv_lengths=lengths)):  # decoder, vision blocks
    # impl=None is jax.nn.dot_product_attention's XLA path: the same call as 'cudnn' on GPU.
    run = jax.jit(layers.attention, static_argnames="impl")  # one compile, not op by op
    kt, vt = layers.key_layout(k), layers.value_layout(v)
    np.testing.assert_allclose(run(q, kt, vt, impl=None, **kwargs),
                               run(q, kt, vt, impl="xla", **kwargs), atol=1e-5,
                               err_msg=str(list(kwargs)))


def test_one_query_attention_equals_numpy_softmax_attention():
  """A decode step's attention (S = 1: products and sums, no matmuls) against numpy."""
  rng = np.random.default_rng(2)
  b, n, kv_heads, t, d = 3, 6, 2, 9, 8
  q = rng.standard_normal((b, 1, n, d), dtype=np.float32)
  k, v = (rng.standard_normal((b, t, kv_heads, d), dtype=np.float32) for _ in range(2))
  mask = rng.random((b, 1, t)) < 0.7
  mask[:, :, 0] = True
  lengths = np.asarray([9, 5, 1], np.int32)
  visible = mask[:, 0] & (np.arange(t)[None] < lengths[:, None])  # [B, T]
  group = np.repeat(np.arange(kv_heads), n // kv_heads)  # query head -> its KV head
  scores = np.einsum("bnd,btnd->bnt", q[:, 0], k[:, :, group]) / np.sqrt(d)
  scores = np.where(visible[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum("bnt,btnd->bnd", probs, v[:, :, group])[:, None]
  run = jax.jit(layers.attention)
  kt, vt = layers.key_layout(k), layers.value_layout(v)
  np.testing.assert_allclose(run(q, kt, vt, mask=mask, kv_lengths=lengths), want, atol=1e-5)
  as_bf16 = lambda x: jnp.asarray(x, jnp.bfloat16)
  got16 = run(as_bf16(q), as_bf16(kt), as_bf16(vt), mask=mask, kv_lengths=lengths)
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got16, np.float32), want, atol=5e-2)


def test_prefix_attention_equals_numpy_over_copied_prefixes():
  """Rows 3i..3i+2 share prefix i (partly padding) and have causal own keys: XLA's shared-prefix
  einsums, whole or in query blocks (40 queries: blocks of 16, 16 and 8), and the fused-kernel
  path (impl None: each row gets a copy) equal numpy softmax attention over [prefix, own keys],
  and the XLA paths' gradients equal the copy path's."""
  rng = np.random.default_rng(4)
  b, n, s, p, heads, kv_heads, d = 2, 3, 40, 5, 4, 2, 8
  r = b * n
  q = rng.standard_normal((r, s, heads, d), dtype=np.float32)
  k, v = (rng.standard_normal((r, s, kv_heads, d), dtype=np.float32) for _ in range(2))
  pk, pv = (rng.standard_normal((b, p, kv_heads, d), dtype=np.float32) for _ in range(2))
  prefix_mask = np.ones((b, p), np.int32)
  prefix_mask[1, :2] = 0  # prompt 1 is left-padded
  mask = np.broadcast_to(np.tril(np.ones((s, s), bool)), (r, s, s))
  keys = np.concatenate([np.repeat(pk, n, 0), k], 1)  # [R, P + S, K, D]
  values = np.concatenate([np.repeat(pv, n, 0), v], 1)
  visible = np.concatenate([np.repeat(prefix_mask, n, 0)[:, None].repeat(s, 1) == 1, mask], 2)
  group = np.repeat(np.arange(kv_heads), heads // kv_heads)
  scores = np.einsum("rsnd,rtnd->rnst", q, keys[:, :, group]) / np.sqrt(d)
  scores = np.where(visible[:, None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum("rnst,rtnd->rsnd", probs, values[:, :, group])
  args = (layers.key_layout(k), layers.value_layout(v), mask, layers.key_layout(pk),
          layers.value_layout(pv), prefix_mask)
  paths = dict(whole=dict(impl="xla"), blocks=dict(impl="xla", blocks=3), copies=dict(impl=None))
  run = jax.jit(layers.prefix_attention, static_argnames=("impl", "blocks"))
  for name, kw in paths.items():
    np.testing.assert_allclose(run(q, *args, **kw), want, atol=1e-5, err_msg=name)
  weights = rng.standard_normal(want.shape, dtype=np.float32)
  loss = lambda *a, **kw: (layers.prefix_attention(*a, **kw) * weights).sum()
  grads = {name: jax.jit(jax.grad(functools.partial(loss, **kw), argnums=(0, 1, 2, 4, 5)))(
      q, *args) for name, kw in paths.items()}
  for name in ("whole", "blocks"):
    for got, copied in zip(grads[name], grads["copies"]):
      np.testing.assert_allclose(got, copied, atol=1e-5, err_msg=name)


def test_remat_wraps_every_block_and_keeps_gradients():
  tiny = ModelConfig.tiny()  # 2 decoder layers, 2 vision blocks
  grid = np.asarray([(1, 4, 4)])
  ids = np.asarray([[1, 2, tiny.vision_start_token_id] + [tiny.image_token_id] * 4
                    + [tiny.vision_end_token_id, 3, 4, 5]], np.int32)
  pixels = np.random.default_rng(0).standard_normal((16, tiny.vision.patch_dim), np.float32)

  def loss_fn(model, ids, pixels, grid):
    extra = prepare_inputs(model.config, ids, None, grid)
    logits = model(ids[:, :-1], None, pixels, position_ids=extra["position_ids"][..., :-1],
                   vision_inputs=extra["vision_inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  graphdef, state = nnx.split(init_from_config(tiny.replace(remat="dots"), 0))
  jaxpr = jax.make_jaxpr(lambda s: loss_fn(nnx.merge(graphdef, s), ids, pixels, grid))(state)
  assert str(jaxpr).count("remat2[") == tiny.text.num_layers + tiny.vision.depth
  # The GRPO forward's two decoder passes (the prompt into its cache, the responses on top).
  extra = prepare_inputs(tiny, ids, None, grid)
  top = int(extra["position_ids"].max()) + 1
  batch = dict(prompt_ids=ids, prompt_mask=np.ones_like(ids),
               prompt_position_ids=extra["position_ids"],
               response_ids=np.asarray([[6, 7, 8], [9, 10, 11]], np.int32),
               response_mask=np.ones((2, 3), np.int32),
               response_position_ids=np.broadcast_to(top + np.arange(3), (3, 2, 3)),
               pixel_values=pixels, vision_inputs=extra["vision_inputs"])
  jaxpr = jax.make_jaxpr(lambda s: rft.response_logprobs(graphdef, s, batch))(state)
  assert str(jaxpr).count("remat2[") == 2 * tiny.text.num_layers + tiny.vision.depth

  # Gradients through one rematerialised decoder layer equal the plain ones (text only: a
  # backward compile costs ~10 s per model on this CPU).
  config = tiny.replace(vision=None, text=dataclasses.replace(tiny.text, num_layers=1))
  text_ids = np.arange(1, 11, dtype=np.int32)[None]
  grad_fn = nnx.jit(nnx.grad(lambda m: loss_fn(m, text_ids, None, None)))
  expected = grad_fn(init_from_config(config, 0))
  got = grad_fn(init_from_config(config.replace(remat="full"), 0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), expected, got)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(expected)) > 0


@pytest.mark.parametrize("dtype, atol", [(np.float32, 1e-5), (jnp.bfloat16, 4e-2)])
def test_attention_backward_equals_autodiff(dtype, atol):
  # The hand-written backward of the training attention against JAX's own differentiation of
  # the same forward, with a cotangent on every row: rows whose keys are all masked (padding
  # queries) included.
  rng = np.random.default_rng(2)
  b, kv_heads, g, s, t, d = 2, 2, 3, 5, 7, 4
  q, d_out = (rng.standard_normal((b, kv_heads, g, s, d)) for _ in range(2))
  k, v = rng.standard_normal((b, kv_heads, d, t)), rng.standard_normal((b, kv_heads, t, d))
  mask = rng.random((b, s, t)) < 0.6
  mask[0, 1] = False
  q, k, v, d_out = (jnp.asarray(x, dtype) for x in (q, k, v, d_out))

  def grads(attend):
    out, vjp = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
    return (out, *vjp(d_out))

  got = jax.jit(lambda: grads(layers._differentiable_attention))()
  want = jax.jit(lambda: grads(layers._grouped_attention))()
  for a, w in zip(got, want):
    assert a.dtype == w.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(w, np.float32), atol=atol)
  assert float(jnp.abs(got[2]).max()) > 0.1  # d_k is not trivially zero


def test_causal_blocks_equal_the_full_square_with_gradients():
  rng = np.random.default_rng(1)
  s = 50  # 4 blocks of 16 queries: 16, 16, 16, 2
  q = rng.standard_normal((2, s, 4, 8), dtype=np.float32)
  k, v = (rng.standard_normal((2, s, 2, 8), dtype=np.float32) for _ in range(2))
  real = np.ones((2, s), bool)
  real[1, :5] = False  # left padding
  mask = np.tril(np.ones((s, s), bool))[None] & real[:, None, :]
  # Padding queries see no key: their (uniform) rows are meaningless, and get no cotangent.
  cotangent = rng.standard_normal(q.shape, dtype=np.float32) * real[:, :, None, None]

  def loss(blocks, q, k, v):
    kt, vt = layers.key_layout(k), layers.value_layout(v)
    out = layers.causal_attention(q, kt, vt, mask, blocks=blocks)
    return jnp.sum(out * cotangent), out

  grad = jax.jit(jax.grad(loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
  (want, full), (got, blocked) = grad(1, q, k, v), grad(4, q, k, v)
  np.testing.assert_allclose(blocked[real], full[real], atol=1e-5)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda *a: loss(4, *a))(q, k, v))
  assert jaxpr.count("dot_general") == 8  # 4 blocks x (scores, values): the square is split
