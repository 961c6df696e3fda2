"""gated_mlp's hand-written backward against autodiff of the plain formula; GatedMLP's wiring."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpt_jax.models.qwen2_5_vl import layers

N, D, F = 10, 6, 9


def reference(act, x, w_gate_up, b_gate_up, w_down, b_down):
  gate, up = x @ w_gate_up[:, 0], x @ w_gate_up[:, 1]
  if b_gate_up is not None:
    gate, up = gate + b_gate_up[0], up + b_gate_up[1]
  out = (act(gate) * up) @ w_down
  return out if b_down is None else out + b_down


def draw(bias: bool, dtype=jnp.float32):
  rng = np.random.default_rng(0)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), dtype)
  return (arr(N, D), arr(D, 2, F), arr(2, F) if bias else None, arr(F, D),
          arr(D) if bias else None), arr(N, D)


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_gradients_equal_autodiff(act, bias):
  fn = layers.activation(act)
  args, cotangent = draw(bias)
  np.testing.assert_allclose(jax.jit(layers.gated_mlp, static_argnums=0)(fn, *args),
                             reference(fn, *args), rtol=1e-5, atol=1e-5)
  wrt = (0, 1, 2, 3, 4) if bias else (0, 1, 3)
  loss = lambda f: lambda *a: jnp.sum(f(fn, *a) * cotangent)
  ours = jax.jit(jax.grad(loss(layers.gated_mlp), wrt))(*args)
  want = jax.grad(loss(reference), wrt)(*args)
  for i, a, b in zip(wrt, ours, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"argument {i}")


def test_bfloat16_cotangents_keep_the_primal_dtypes():
  args, cotangent = draw(True, jnp.bfloat16)
  grads = jax.grad(lambda *a: jnp.sum(layers.gated_mlp(jax.nn.silu, *a) * cotangent),
                   (0, 1, 2, 3, 4))(*args)
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 5
  want = jax.grad(lambda *a: jnp.sum(reference(jax.nn.silu, *a) * cotangent), 1)(
      *[None if a is None else a.astype(jnp.float32) for a in args])
  np.testing.assert_allclose(grads[1].astype(jnp.float32), want, rtol=0.05, atol=0.1)


@pytest.mark.parametrize("bias", [False, True])
def test_module_reads_gate_up_and_down_kernels(bias):
  mlp = layers.GatedMLP(D, F, "silu", bias=bias, dtype=jnp.float32, param_dtype=jnp.float32,
                        keys=layers.Keys(jax.random.key(0)))
  projections = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
  if bias:  # nonzero biases, so that a swapped or dropped one shows
    for i, p in enumerate(projections):
      p.bias[...] = jax.random.normal(jax.random.key(i + 1), p.bias.shape)
  x = jax.random.normal(jax.random.key(9), (2, 5, D))  # leading dims are kept

  def plain(gate_kernel):
    (g, bg), (u, bu), (d, bd) = [(p.kernel[...], 0 if p.bias is None else p.bias[...])
                                 for p in projections]
    return (jax.nn.silu(x @ gate_kernel + bg) * (x @ u + bu)) @ d + bd

  gate = mlp.gate_proj.kernel[...]
  np.testing.assert_allclose(mlp(x), plain(gate), rtol=1e-5, atol=1e-6)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(mlp)
  np.testing.assert_allclose(grads.gate_proj.kernel[...],
                             jax.grad(lambda g: jnp.sum(plain(g) ** 2))(gate),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["out_in", "blocks"])
def test_linear_stored_in_a_kernel_layout_computes_the_same(layout):
  # Two input axes (o_proj) and two output axes (a q/k/v projection), with a bias.
  keys = layers.Keys(jax.random.key(0))
  kw = dict(bias=True, dtype=jnp.float32, param_dtype=jnp.float32, keys=keys)
  parent = nnx.List([layers.Linear((3, 4), (5,), ("heads", "head_dim", "embed"), **kw),
                     layers.Linear((5,), (3, 4), ("embed", "heads", "head_dim"), **kw)])
  for lin in parent:
    lin.bias[...] = jax.random.normal(keys(), lin.bias.shape)
  x2, x1 = jax.random.normal(keys(), (2, 6, 3, 4)), jax.random.normal(keys(), (2, 6, 5))
  before = [parent[0](x2), parent[1](x1)]
  np.testing.assert_allclose(before[0], jnp.einsum("bshd,hde->bse", x2, parent[0].kernel[...])
                             + parent[0].bias[...], rtol=1e-5, atol=1e-6)
  layers.store_kernels(parent, layout)
  assert [lin.kernel_layout for lin in parent] == [layout, layout]
  if layout == "out_in":
    assert parent[0].kernel.shape == (5, 3, 4) and parent[1].kernel.shape == (3, 4, 5)
    assert parent[0].kernel.get_metadata()["out_sharding"] == ("embed", "heads", "head_dim")
    assert parent[1].kernel.get_metadata()["out_sharding"] == ("heads", "head_dim", "embed")
  else:  # [ceil(out / 32), in, 32]
    assert parent[0].kernel.shape == (1, 12, 32) and parent[1].kernel.shape == (1, 5, 32)
  stored = [lin.kernel[...] for lin in parent]
  np.testing.assert_allclose(parent[0](x2), before[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(parent[1](x1), before[1], rtol=1e-5, atol=1e-6)
  layers.store_kernels(parent, "out_in")  # already stored: unchanged
  for lin, kernel in zip(parent, stored):
    assert lin.kernel_layout == layout
    np.testing.assert_array_equal(lin.kernel[...], kernel)


def test_blocks_layout_needs_float32_linears():
  lin = layers.Linear((4,), (8,), ("embed", "mlp"), bias=False, dtype=jnp.bfloat16,
                      param_dtype=jnp.float32, keys=layers.Keys(jax.random.key(0)))
  with pytest.raises(ValueError, match="computes in float32; a Linear computes in bfloat16"):
    layers.store_kernels(lin, "blocks")
  with pytest.raises(ValueError, match="kernel layout must be one of"):
    layers.store_kernels(lin, "columns")
  assert lin.kernel_layout == "in_out" and lin.kernel.shape == (4, 8)


@pytest.mark.parametrize("layout", ["out_in", "blocks"])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_mlp_stored_in_a_kernel_layout_computes_the_same(bias, layout):
  mlp = layers.GatedMLP(D, F, "gelu", bias=bias, dtype=jnp.float32, param_dtype=jnp.float32,
                        keys=layers.Keys(jax.random.key(0)))
  if bias:
    for i, p in enumerate((mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
      p.bias[...] = jax.random.normal(jax.random.key(i + 1), p.bias.shape)
  x = jax.random.normal(jax.random.key(9), (2, 5, D))
  before = mlp(x)
  layers.store_kernels(mlp, layout)
  assert mlp.gate_proj.kernel.shape == {"out_in": (F, D), "blocks": (-(-F // 32), D, 32)}[layout]
  np.testing.assert_allclose(mlp(x), before, rtol=1e-5, atol=1e-6)
