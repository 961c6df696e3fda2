"""log p(target) of every token through the LM head, with a hand-written backward.

    logprob, hit = token_logprobs(hidden [N, D], kernel [D, V], targets [N], chunk=0)

logprob = log_softmax(hidden @ kernel)[target] in float32 and hit = (the target's logit is the
largest), both [N]. Only `logprob` has a gradient. The forward keeps the logits (or, with
`chunk` > 0, only their logsumexp, and recomputes each chunk of `chunk` tokens in the backward,
so no [N, V] array exists: the memory bound of a long batch with a 152k vocabulary). The
backward forms g * (one_hot - softmax) in one pass and its two matmuls; left to autodiff, XLA
builds the same from several passes over [N, V] and a transposed copy of it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _logits(hidden, kernel):
  return jnp.dot(hidden, kernel, preferred_element_type=jnp.float32)


def _forward(hidden, kernel, targets):
  """(logprob, hit, logsumexp, logits) of one chunk."""
  logits = _logits(hidden, kernel)
  top = jnp.max(logits, axis=-1)
  lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=-1))
  picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
  return picked - lse, picked >= top, lse, logits


def _backward(hidden, kernel, targets, logits, lse, g):
  """d logprob / d (hidden, kernel) of one chunk, g [n] the logprob cotangent."""
  one_hot = jnp.arange(logits.shape[-1])[None, :] == targets[:, None]
  d_logits = (one_hot.astype(jnp.float32) - jnp.exp(logits - lse[:, None])) * g[:, None]
  d_logits = d_logits.astype(kernel.dtype)
  d_hidden = jax.lax.dot_general(d_logits, kernel, (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32)
  d_kernel = jax.lax.dot_general(hidden, d_logits, (((0,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
  return d_hidden.astype(hidden.dtype), d_kernel


def _chunks(x, chunk):
  return x.reshape(-1, chunk, *x.shape[1:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _token_logprobs(hidden, kernel, targets, chunk):
  return _token_logprobs_fwd(hidden, kernel, targets, chunk)[0]


def _token_logprobs_fwd(hidden, kernel, targets, chunk):
  if not chunk:
    logprob, hit, lse, logits = _forward(hidden, kernel, targets)
    return (logprob, hit), (hidden, kernel, targets, lse, logits)
  logprob, hit, lse = jax.lax.map(lambda a: _forward(a[0], kernel, a[1])[:3],
                                  (_chunks(hidden, chunk), _chunks(targets, chunk)))
  return (logprob.reshape(-1), hit.reshape(-1)), (hidden, kernel, targets, lse, None)


def _token_logprobs_bwd(chunk, residuals, cotangents):
  hidden, kernel, targets, lse, logits = residuals
  g = cotangents[0].astype(jnp.float32)
  if not chunk:
    d_hidden, d_kernel = _backward(hidden, kernel, targets, logits, lse, g)
    return d_hidden, d_kernel.astype(kernel.dtype), None

  def step(d_kernel, inputs):
    h, t, l, gc = inputs
    d_h, d_k = _backward(h, kernel, t, _logits(h, kernel), l, gc)
    return d_kernel + d_k, d_h

  d_kernel, d_hidden = jax.lax.scan(
      step, jnp.zeros(kernel.shape, jnp.float32),
      (_chunks(hidden, chunk), _chunks(targets, chunk), lse, _chunks(g, chunk)))
  return d_hidden.reshape(hidden.shape), d_kernel.astype(kernel.dtype), None


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)


def token_logprobs(hidden: jax.Array, kernel: jax.Array, targets: jax.Array, *,
                   chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """log_softmax(hidden @ kernel)[..., target] (float32) and the argmax hit, over any leading
  shape of `hidden` [..., D] and `targets` [...]; `chunk` > 0 bounds the logits held at once to
  chunk x V (the tokens are padded to a multiple of it)."""
  if chunk < 0:
    raise ValueError(f"chunk must be >= 0 tokens, got {chunk}")
  lead = targets.shape
  if hidden.shape[:-1] != lead:
    raise ValueError(f"hidden {hidden.shape} and targets {targets.shape} disagree on the tokens")
  hidden = hidden.reshape(-1, hidden.shape[-1])
  targets = targets.reshape(-1).astype(jnp.int32)
  n = targets.shape[0]
  if chunk >= n:
    chunk = 0
  pad = -n % chunk if chunk else 0
  if pad:
    hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
    targets = jnp.pad(targets, (0, pad))
  logprob, hit = _token_logprobs(hidden, kernel.astype(hidden.dtype), targets, chunk)
  return logprob[:n].reshape(lead), hit[:n].reshape(lead)
