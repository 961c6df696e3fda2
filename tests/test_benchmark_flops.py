"""The FLOP count behind benchmarks/sampler.py's compute bound, against XLA's cost analysis of
the compiled prefill and decode-step programs."""
from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import pytest
from flax import nnx

from cpt_jax.models import init_from_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import sampler as sampler_bench  # noqa: E402  pylint: disable=wrong-import-position


def test_flops_per_call_matches_xla_cost_analysis():
  config = sampler_bench._text_config("small")  # pylint: disable=protected-access
  model = init_from_config(config, 0)
  batch, prompt, new = sampler_bench.BATCH, sampler_bench.PROMPT_LEN, sampler_bench.NEW_TOKENS
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
