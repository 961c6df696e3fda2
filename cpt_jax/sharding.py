"""Mesh axes and logical-axis rules: the one place that maps model axes to devices.

Model code names axes logically (parameters: `nnx.Param(..., sharding_names=(...))`;
activations: `constrain(x, (...))`). This module turns those names into PartitionSpecs.
"""
from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (or axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),
)

_RULES = contextvars.ContextVar("cpt_jax_logical_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def logical_rules(rules):
  """Sets the logical-axis rules used by `logical_to_spec` and `constrain` in this context."""
  token = _RULES.set(tuple(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def logical_to_spec(logical_axes, rules=None) -> P:
  """('batch', 'length', 'embed') -> PartitionSpec(('data', 'fsdp'), None, 'fsdp')."""
  table = dict(_RULES.get() if rules is None else rules)
  return P(*(None if name is None else table.get(name) for name in logical_axes))


def constrain(x: jax.Array, logical_axes) -> jax.Array:
  """Constrains an activation's sharding by logical axis names; a no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))
