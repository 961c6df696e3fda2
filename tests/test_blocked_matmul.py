"""The CPU kernel of cpt_jax.kernels.blocked_matmul against NumPy float64 products: row counts
around its 8-row tile, widths that are and are not multiples of its 32-column blocks, several
kernels side by side, inside a jitted loop; bad shapes and a failing compiler."""
from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.kernels.blocked_matmul import BLOCK, blocked_matmul, to_blocks


def _product(x, kernels):
  return np.concatenate([x.astype(np.float64) @ k.astype(np.float64) for k in kernels], axis=-1)


@pytest.mark.parametrize("rows, k, widths", [
    (1, 5, (33,)), (3, 64, (96,)), (8, 256, (384,)), (13, 40, (96, 40, 7)), (70, 128, (64, 64)),
])
def test_products_equal_numpy(rows, k, widths):
  rng = np.random.default_rng(rows)
  x = rng.normal(size=(rows, k)).astype(np.float32)
  kernels = [rng.normal(size=(k, w)).astype(np.float32) for w in widths]
  blocks = [to_blocks(jnp.asarray(kernel)) for kernel in kernels]
  assert [b.shape for b in blocks] == [(-(-w // BLOCK), k, BLOCK) for w in widths]
  y = jax.jit(lambda x, *b: blocked_matmul(x, *b, widths=widths))(x, *blocks)
  assert y.shape == (rows, sum(widths)) and y.dtype == jnp.float32
  np.testing.assert_allclose(y, _product(x, kernels), rtol=1e-5, atol=1e-4 * np.sqrt(k))


def test_leading_axes_and_a_jitted_loop():
  """x [2, 3, K]; 20 chained products in a fori_loop (as a decode loop runs the kernel)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 64)).astype(np.float32)
  kernel = (rng.normal(size=(64, 64)) / 8).astype(np.float32)
  blocks = to_blocks(jnp.asarray(kernel))
  step = lambda _, h: jnp.tanh(blocked_matmul(h, blocks, widths=(64,)))
  y = jax.jit(lambda x: jax.lax.fori_loop(0, 20, step, x))(x)
  expected = x.astype(np.float64)
  for _ in range(20):
    expected = np.tanh(expected @ kernel)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


def test_bad_shapes_are_named():
  x = jnp.ones((8, 64))
  blocks = to_blocks(jnp.ones((64, 40)))  # 2 blocks
  with pytest.raises(ValueError, match=r"must be \[2, 32, 32\] blocks, got \(2, 64, 32\)"):
    blocked_matmul(jnp.ones((8, 32)), blocks, widths=(40,))
  with pytest.raises(ValueError, match=r"a kernel of 80 columns .* must be \[3, 64, 32\]"):
    blocked_matmul(x, blocks, widths=(80,))
  with pytest.raises(ValueError, match="2 kernels for 1 widths"):
    blocked_matmul(x, blocks, blocks, widths=(40,))


BUILD = """
import jax.numpy as jnp
from cpt_jax.kernels import blocked_matmul as bm
try:
  bm.blocked_matmul(jnp.ones((2, 4)), bm.to_blocks(jnp.ones((4, 3))), widths=(3,))
except RuntimeError as e:
  print("ERROR", e)
else:
  print("BUILT")
print("AVAILABLE", bm.available())
"""


def test_build_into_an_empty_cache_and_a_failing_compiler(tmp_path):
  def run(**env):
    return subprocess.run([sys.executable, "-c", BUILD], capture_output=True, text=True,
                          check=True, env=dict(os.environ, CPT_JAX_CACHE=str(tmp_path), **env)).stdout
  out = run(CXX="false")
  assert "ERROR blocked_matmul: compiling blocked_matmul.cc failed (false -O3" in out
  assert "AVAILABLE False" in out
  assert "cannot run the C++ compiler 'no-such-cxx'" in run(CXX="no-such-cxx")
  assert not list((tmp_path / "kernels").glob("*.so"))
  assert run().splitlines() == ["BUILT", "AVAILABLE True"]
  assert len(list((tmp_path / "kernels").glob("*.so"))) == 1
