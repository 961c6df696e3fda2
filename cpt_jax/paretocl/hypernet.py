"""Preference-conditioned hypernetwork and preference utilities (ParetoCL).

A hypernetwork Psi maps a preference alpha on the simplex (one weight per objective) to a
set of generated arrays of arbitrary shapes. The classic ParetoCL head generates a linear
classifier (W [feat, classes], b [classes]) applied to shared backbone features; the same
`PreferenceHypernet` can generate adapter weights or low-rank scales for a VLM.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx


class PreferenceHypernet(nnx.Module):
  """MLP num_objectives -> hidden (x num_hidden_layers, ReLU) -> one linear output per array.

  `out_shapes` names the generated arrays and their shapes. `out_fan_in` marks arrays used as
  weights with that fan-in: each starts distributed like a directly initialised weight,
  N(0, 1/fan_in), from its output layer's bias (the alpha-independent part), plus a smaller
  alpha-dependent part. Other arrays start small (std <= 1/sqrt(hidden)) around zero.
  Calling with alpha [..., num_objectives] returns {name: array [..., *shape]}.
  """

  def __init__(self, out_shapes: Mapping[str, Sequence[int]], *, num_objectives: int = 2,
               hidden: int = 100, num_hidden_layers: int = 2,
               out_fan_in: Mapping[str, int] | None = None, rngs: nnx.Rngs):
    if num_hidden_layers < 1 or hidden < 1 or not out_shapes:
      raise ValueError(f"PreferenceHypernet needs hidden >= 1, num_hidden_layers >= 1 and some "
                       f"outputs, got hidden={hidden}, num_hidden_layers={num_hidden_layers}, "
                       f"out_shapes={dict(out_shapes)}")
    self.num_objectives = num_objectives
    self.out_shapes = {name: tuple(shape) for name, shape in out_shapes.items()}
    dims = [num_objectives] + [hidden] * num_hidden_layers
    self.trunk = nnx.List(
        [nnx.Linear(d_in, d_out, rngs=rngs) for d_in, d_out in zip(dims, dims[1:])])
    fan_in = dict(out_fan_in or {})
    outputs = {}
    for name, shape in self.out_shapes.items():
      # The trunk's ReLU features have E[h^2] <= 1 for alpha on the simplex, so a kernel of
      # std 1/sqrt(hidden * fan_in) keeps the alpha-dependent part below 1/sqrt(fan_in).
      std = 1.0 / math.sqrt(hidden * fan_in.get(name, 1))
      bias_init = (nnx.initializers.normal(1.0 / math.sqrt(fan_in[name])) if name in fan_in
                   else nnx.initializers.zeros_init())
      outputs[name] = nnx.Linear(hidden, math.prod(shape), kernel_init=nnx.initializers.normal(std),
                                 bias_init=bias_init, rngs=rngs)
    self.outputs = nnx.Dict(outputs)

  def __call__(self, alpha: jax.Array) -> dict[str, jax.Array]:
    if alpha.shape[-1] != self.num_objectives:
      raise ValueError(
          f"alpha must end in {self.num_objectives} objectives, got shape {alpha.shape}")
    h = alpha
    for layer in self.trunk:
      h = jax.nn.relu(layer(h))  # [..., hidden]
    return {name: self.outputs[name](h).reshape(*alpha.shape[:-1], *shape)
            for name, shape in self.out_shapes.items()}


class HyperHead(nnx.Module):
  """Classifier head generated from a preference: logits = h(x) W(alpha) + b(alpha)."""

  def __init__(self, num_features: int, num_classes: int, *, hidden: int = 100,
               num_hidden_layers: int = 2, rngs: nnx.Rngs):
    self.hypernet = PreferenceHypernet(
        {"kernel": (num_features, num_classes), "bias": (num_classes,)}, num_objectives=2,
        hidden=hidden, num_hidden_layers=num_hidden_layers,
        out_fan_in={"kernel": num_features}, rngs=rngs)

  def __call__(self, features: jax.Array, alphas: jax.Array) -> jax.Array:
    """features [B, F], alphas [K, 2] -> logits [K, B, classes] (one backbone pass, K heads)."""
    head = self.hypernet(alphas)  # kernel [K, F, C], bias [K, C]
    return jnp.einsum("bf,kfc->kbc", features, head["kernel"]) + head["bias"][:, None, :]


def sample_preferences(rng: jax.Array, num: int, num_objectives: int = 2,
                       concentration: float = 1.0) -> jax.Array:
  """num preferences from the symmetric Dirichlet(concentration) on the simplex: [num, M]."""
  return jax.random.dirichlet(rng, jnp.full((num_objectives,), concentration), (num,))


def preference_sweep(num_points: int) -> jax.Array:
  """Evenly spaced (alpha_replay, alpha_new) from (1, 0) to (0, 1): [num_points, 2]."""
  alpha_new = jnp.linspace(0.0, 1.0, num_points)
  return jnp.stack([1.0 - alpha_new, alpha_new], axis=-1)


def softmax_entropy(logits: jax.Array) -> jax.Array:
  """Entropy of softmax(logits) over the last axis (nats)."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def min_entropy_select(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-sample choice among K preferences of the least uncertain prediction.

  logits [K, B, C] -> (predicted class [B], chosen preference index [B]).
  """
  chosen = jnp.argmin(softmax_entropy(logits), axis=0)  # [B]
  chosen_logits = jnp.take_along_axis(logits, chosen[None, :, None], axis=0)[0]  # [B, C]
  return jnp.argmax(chosen_logits, axis=-1), chosen
