"""token_logprobs: values, argmax hits and gradients against autodiff of a plain log_softmax."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.train.token_logprobs import token_logprobs

N_TOKENS, DIM, VOCAB = (3, 7), 16, 50


def reference(hidden, kernel, targets):
  logp = jax.nn.log_softmax(hidden @ kernel, axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(*N_TOKENS, DIM)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(DIM, VOCAB)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, VOCAB, N_TOKENS), jnp.int32)
  cotangent = jnp.asarray(rng.normal(size=N_TOKENS), jnp.float32)
  return hidden, kernel, targets, cotangent


@pytest.mark.parametrize("chunk", [0, 4, 5, 21, 100])  # none, padded, exact, one, larger
def test_values_hits_and_gradients(inputs, chunk):
  hidden, kernel, targets, cotangent = inputs
  fn = jax.jit(lambda h, w: token_logprobs(h, w, targets, chunk=chunk))
  logprob, hit = fn(hidden, kernel)
  np.testing.assert_allclose(logprob, reference(hidden, kernel, targets), atol=2e-6)
  np.testing.assert_array_equal(hit, jnp.argmax(hidden @ kernel, axis=-1) == targets)
  ours = jax.grad(lambda h, w: jnp.sum(fn(h, w)[0] * cotangent), (0, 1))(hidden, kernel)
  want = jax.grad(lambda h, w: jnp.sum(reference(h, w, targets) * cotangent), (0, 1))(
      hidden, kernel)
  for a, b in zip(ours, want):
    np.testing.assert_allclose(a, b, atol=5e-6)


def test_bfloat16_compute_keeps_float32_logprobs(inputs):
  hidden, kernel, targets, _ = inputs
  logprob, _ = token_logprobs(hidden.astype(jnp.bfloat16), kernel, targets)
  assert logprob.dtype == jnp.float32
  np.testing.assert_allclose(logprob, reference(hidden, kernel, targets), atol=0.3)
  grad = jax.grad(lambda h: token_logprobs(h, kernel, targets)[0].sum())(
      hidden.astype(jnp.bfloat16))
  assert grad.dtype == jnp.bfloat16


def test_bad_arguments_are_named(inputs):
  hidden, kernel, targets, _ = inputs
  with pytest.raises(ValueError, match="chunk must be >= 0"):
    token_logprobs(hidden, kernel, targets, chunk=-1)
  with pytest.raises(ValueError, match="disagree on the tokens"):
    token_logprobs(hidden[:, :3], kernel, targets)
