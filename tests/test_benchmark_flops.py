"""The FLOP count behind benchmarks/sampler.py's compute bound, against XLA's cost analysis of
the compiled prefill and decode-step programs; the weight matmuls benchmarks/decode_bounds.py
times, against those of the model's decode step."""
from __future__ import annotations

import math
import os
import sys

import jax
import jax.extend
import jax.numpy as jnp
import pytest
from flax import nnx

from cpt_jax.models import init_from_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import sampler as sampler_bench  # noqa: E402  pylint: disable=wrong-import-position
import shapes  # noqa: E402  pylint: disable=wrong-import-position


def test_flops_per_call_matches_xla_cost_analysis():
  config = shapes.text_config("small")
  model = init_from_config(config, 0)
  batch, prompt, new = shapes.BATCH, shapes.PROMPT_LEN, shapes.NEW_TOKENS
  slots = prompt + new - 1
  ids = jnp.ones((batch, prompt), jnp.int32)

  def prefill(model, ids):
    return model.prefill(ids, jnp.ones_like(ids), model.init_cache(batch, slots, jnp.float32))

  def decode_step(model, tokens, cache):
    return model.decode_step(tokens, cache)

  cost = lambda fn, *args: nnx.jit(fn).lower(*args).compile().cost_analysis()["flops"]
  cache = model.init_cache(batch, slots, jnp.float32)
  xla = cost(prefill, model, ids) + (new - 1) * cost(
      decode_step, model, jnp.ones((batch, 1), jnp.int32), cache)
  # XLA also counts the elementwise work (norms, rope, softmax), ~1% here.
  assert sampler_bench.flops_per_call(config) == pytest.approx(xla, rel=0.02)


def _weight_matmuls(jaxpr) -> list[tuple[int, int]]:
  """[in, out] of every dot_general without batch dimensions (a matmul by a weight) in jaxpr and
  the jaxprs it calls: in = the right operand's contracted size, out = the rest of it."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (_, contracted), (_, batch) = eqn.params["dimension_numbers"]
      if not batch:
        shape = eqn.invars[1].aval.shape
        size_in = math.prod(shape[i] for i in contracted)
        found.append((size_in, math.prod(shape) // size_in))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += _weight_matmuls(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += _weight_matmuls(sub)
  return found


def test_layer_matmuls_are_the_weight_matmuls_of_a_decode_step():
  config = shapes.text_config("small")
  model = init_from_config(config, 0)
  cache = model.init_cache(shapes.BATCH, 16, jnp.float32)
  jaxpr = jax.make_jaxpr(lambda tokens, cache: model.decode_step(tokens, cache))(
      jnp.ones((shapes.BATCH, 1), jnp.int32), cache)
  head = (config.text.hidden_size, config.text.vocab_size)
  assert sorted(_weight_matmuls(jaxpr.jaxpr)) == sorted(
      shapes.layer_matmuls(config) * config.text.num_layers + [head])
