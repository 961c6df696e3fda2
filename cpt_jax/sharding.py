"""Mesh axes and logical-axis rules: the one place that maps model axes to devices.

Model code names axes logically (parameters: `nnx.Param(..., out_sharding=(...))`, the older
spelling `sharding_names=` lands in the same metadata; activations: `constrain(x, (...))`).
This module turns those names into PartitionSpecs on a ('data', 'fsdp', 'tensor') mesh, creates
models directly sharded (`shard_init`) and places host batches (`shard_batch`).

Resolution of one array's logical names, dim by dim:
  * each logical name maps to mesh axes through the active rules (unknown names are an error);
  * a mesh axis already used by an earlier dim is dropped (activations ('batch', 'length',
    'embed') shard batch over fsdp and leave embed whole, params ('embed', 'mlp') shard embed);
  * a dim keeps the longest prefix of its mesh axes whose size product divides it, so KV heads
    fewer than the tensor axis are replicated instead of failing.

Typical use:
  mesh = make_mesh({'fsdp': -1})
  model = shard_init(lambda: Model(cfg, rngs=nnx.Rngs(0)), mesh)
  with use_mesh(mesh):
    logits = jitted_forward(model, shard_batch(batch, mesh))
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, Union

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

_log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = Union[str, tuple[str, ...], None]
Rules = tuple[tuple[str, MeshAxes], ...]
RulesLike = Union[str, Sequence[tuple[str, MeshAxes]], None]

# Logical axis -> mesh axis (or axes, or None = replicated). Every logical name used by
# model code must appear here; `None` in a names tuple means "not sharded".
DEFAULT_RULES: Rules = (
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


def _preset(**overrides: MeshAxes) -> Rules:
  return tuple((name, overrides.get(name, axes)) for name, axes in DEFAULT_RULES)


# Named presets; the mesh shape decides how much each one actually splits.
RULE_PRESETS: dict[str, Rules] = {
    # Params sharded over fsdp on `embed` and over tensor on heads / mlp / vocab.
    "fsdp_tensor": DEFAULT_RULES,
    # ZeRO-3 style: params split on `embed` only, no tensor parallelism.
    "fsdp": _preset(mlp=None, heads=None, kv_heads=None, vocab=None),
    # Megatron style: params split on heads / mlp / vocab only, `embed` kept whole.
    "tensor": _preset(embed=None),
    # Pure data parallelism: params replicated, only the batch is split.
    "data": _preset(embed=None, mlp=None, heads=None, kv_heads=None, vocab=None),
}

_RULES = contextvars.ContextVar("cpt_jax_logical_rules", default=DEFAULT_RULES)


def resolve_rules(rules: RulesLike = None) -> Rules:
  """A preset name, an explicit rule table, or None (the rules active in this context)."""
  if rules is None:
    return _RULES.get()
  if isinstance(rules, str):
    if rules not in RULE_PRESETS:
      raise ValueError(f"Unknown sharding rules preset {rules!r}; known: {sorted(RULE_PRESETS)}.")
    return RULE_PRESETS[rules]
  table = tuple((name, axes) for name, axes in rules)
  for name, axes in table:
    for axis in (axes,) if isinstance(axes, str) else (axes or ()):
      if axis not in MESH_AXES:
        raise ValueError(f"Rule {name!r} -> {axes!r} names mesh axis {axis!r}; "
                         f"mesh axes: {MESH_AXES}.")
  return table


@contextlib.contextmanager
def logical_rules(rules: RulesLike):
  """Sets the logical-axis rules used by `logical_to_spec` and `constrain` in this context."""
  token = _RULES.set(resolve_rules(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: RulesLike = None) -> Iterator[Mesh]:
  """`jax.set_mesh(mesh)` plus (optionally) `logical_rules(rules)`: the context for forwards."""
  with jax.set_mesh(mesh), logical_rules(resolve_rules(rules)):
    yield mesh


# ---------------------------------------------------------------------------
# Logical names -> PartitionSpec
# ---------------------------------------------------------------------------


def _as_axes(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _spec_entry(axes: tuple[str, ...]) -> MeshAxes:
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def _resolve(logical_axes: Sequence[str | None], rules: Rules,
             shape: Sequence[int] | None = None,
             axis_sizes: Mapping[str, int] | None = None) -> tuple[P, list[str]]:
  """PartitionSpec for `logical_axes` plus notes on dims left (partly) replicated by size."""
  table = dict(rules)
  used: set[str] = set()
  entries, notes = [], []
  for dim, name in enumerate(logical_axes):
    if name is None:
      entries.append(None)
      continue
    if not isinstance(name, str) or name not in table:
      raise ValueError(
          f"Unknown logical axis {name!r} in {tuple(logical_axes)}; known: {sorted(table)}. "
          "Add it to the rules in cpt_jax/sharding.py.")
    axes = tuple(a for a in _as_axes(table[name]) if a not in used)
    if shape is not None and axis_sizes is not None:
      kept, product = [], 1
      for axis in axes:
        if shape[dim] % (product * axis_sizes[axis]):
          break
        kept.append(axis)
        product *= axis_sizes[axis]
      if len(kept) < len(axes):
        dropped = {a: axis_sizes[a] for a in axes[len(kept):]}
        notes.append(f"dim {dim} ({name}={shape[dim]}) not divisible by mesh axes {dropped}")
      axes = tuple(kept)
    used.update(axes)
    entries.append(_spec_entry(axes))
  return P(*entries), notes


def logical_to_spec(logical_axes: Sequence[str | None], rules: RulesLike = None) -> P:
  """('batch', 'length', 'embed') -> PartitionSpec(('data', 'fsdp'), None, None).

  A mesh axis serves only the first dim that asks for it (embed's fsdp is taken by batch).
  """
  spec, _ = _resolve(tuple(logical_axes), resolve_rules(rules))
  return spec


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Constrains an activation's sharding by logical axis names; a no-op without a mesh.

  Dims that the mapped mesh axes don't divide stay replicated (e.g. 2 KV heads on tensor=4).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if len(logical_axes) != x.ndim:
    raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} "
                     f"for an array of shape {x.shape}.")
  spec, _ = _resolve(tuple(logical_axes), _RULES.get(), x.shape, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


# ---------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axis types.

  Args:
    shape: sizes by axis name, e.g. {'data': 1, 'fsdp': -1, 'tensor': 2}; omitted axes are 1 and
      one axis may be -1 (all remaining devices).
    devices: defaults to all devices of all processes (`jax.devices()`).
  """
  unknown = sorted(set(shape) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"Unknown mesh axes {unknown}; mesh axes are {MESH_AXES}.")
  devices = list(jax.devices() if devices is None else devices)
  sizes = {axis: shape.get(axis, 1) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
      raise ValueError(f"Mesh axis {axis!r} has size {size!r}; sizes are positive ints or -1.")
  rest = [axis for axis, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ValueError(f"Only one mesh axis may be -1; got {rest} in {dict(shape)}.")
  known = math.prod(size for size in sizes.values() if size != -1)
  if rest:
    if len(devices) % known:
      raise ValueError(f"Mesh {dict(shape)}: the fixed axes ({known} devices) do not divide the "
                       f"{len(devices)} devices.")
    sizes[rest[0]] = len(devices) // known
  elif known != len(devices):
    raise ValueError(f"Mesh {dict(shape)} needs {known} devices but {len(devices)} are given; "
                     "set one axis to -1 to use the rest.")
  return jax.make_mesh(tuple(int(sizes[a]) for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def mesh_config() -> ml_collections.ConfigDict:
  """Config block for a run's mesh: every device on fsdp (a single device is a 1x1x1 mesh)."""
  return ml_collections.ConfigDict({
      "shape": {"data": 1, "fsdp": -1, "tensor": 1},
      # A RULE_PRESETS name: 'fsdp_tensor', 'fsdp', 'tensor' or 'data'.
      "rules": "fsdp_tensor",
  })


def mesh_from_config(config: ml_collections.ConfigDict,
                     devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Rules]:
  """(mesh, rules) from a `mesh_config()` block."""
  return make_mesh(dict(config.shape), devices), resolve_rules(config.rules)


# ---------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------

_logged_notes: set[str] = set()


def _log_once(message: str) -> None:
  if message not in _logged_notes:
    _logged_notes.add(message)
    _log.info(message)


def _variable_sharding(path: str, variable: nnx.Variable, mesh: Mesh,
                       rules: Rules) -> NamedSharding:
  value = variable.get_value()
  names = variable.get_metadata().get("out_sharding")
  shape = getattr(value, "shape", ())
  if not names:
    return NamedSharding(mesh, P())
  if len(names) != len(shape):
    raise ValueError(f"{path}: {len(names)} logical axes {tuple(names)} for shape {tuple(shape)}.")
  spec, notes = _resolve(tuple(names), rules, shape, dict(mesh.shape))
  for note in notes:
    _log_once(f"{path}: {note}; replicated along them.")
  return NamedSharding(mesh, spec)


def param_shardings(tree: Any, mesh: Mesh, rules: RulesLike = None) -> Any:
  """NamedShardings for every Variable of a module or state, from its logical names.

  `tree` is an (abstract or concrete) nnx.Module, an nnx.State, or a pytree holding Variables;
  a module is read as `nnx.state(module)`. Returns the same structure with each Variable's value
  replaced by its NamedSharding (usable as jit `out_shardings` / `device_put` target). Variables
  without `out_sharding` metadata (RNG counters, scalars) are replicated.
  """
  rules = resolve_rules(rules)
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree)

  def one(path, leaf):
    name = jax.tree_util.keystr(path, simple=True, separator=".")
    if isinstance(leaf, nnx.Variable):
      return leaf.replace(_variable_sharding(name, leaf, mesh, rules))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


M = TypeVar("M", bound=nnx.Module)


def shard_init(model_factory: Callable[[], M], mesh: Mesh, rules: RulesLike = None) -> M:
  """Builds `model_factory()` with every parameter created directly in its sharded layout.

  The factory is traced once abstractly to read shapes and logical names, then run under
  `jax.jit(..., out_shardings=...)` so no device ever holds a full unsharded copy.
  """
  rules = resolve_rules(rules)
  graphdefs = []

  def init():
    graphdef, state = nnx.split(model_factory())
    graphdefs.append(graphdef)  # static structure, no arrays
    return state

  # jax.eval_shape rather than nnx.eval_shape: under a mesh context the latter would read the
  # logical names as mesh axes.
  shardings = param_shardings(jax.eval_shape(init), mesh, rules)
  with use_mesh(mesh, rules):
    state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdefs[-1], state)


def shard_model(model: M, mesh: Mesh, rules: RulesLike = None) -> M:
  """Moves an existing model's variables to their sharded layout (in place; returns it)."""
  state = nnx.state(model)
  # One jitted copy: device_put from committed device arrays compiles a reshard per array shape.
  nnx.update(model, jax.jit(lambda s: s, out_shardings=param_shardings(state, mesh, rules))(state))
  return model


# ---------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------

# Which dim of each batch entry is the example dim (default 0); None = replicated, which in a
# multi-process run requires every process to pass the same array.
DEFAULT_BATCH_DIMS: dict[str, int | None] = {"position_ids": 1}  # [3, B, S]


def batch_sharding(mesh: Mesh, ndim: int = 1, batch_dim: int = 0,
                   rules: RulesLike = None) -> NamedSharding:
  """Sharding that splits dim `batch_dim` of an `ndim`-D array by the 'batch' rule."""
  names = [None] * ndim
  names[batch_dim] = "batch"
  return NamedSharding(mesh, logical_to_spec(names, rules))


def _shard_array(key: str, x: Any, mesh: Mesh, batch_dim: int | None, rules: Rules) -> Any:
  x = np.asarray(x)
  if x.dtype.kind in "USO":  # strings stay on the host
    return x
  spec = P()
  if batch_dim is not None:
    names = [None] * x.ndim
    names[batch_dim] = "batch"
    sizes = dict(mesh.shape) if jax.process_count() == 1 else None
    spec, notes = _resolve(names, rules, x.shape, sizes)
    for note in notes:
      _log_once(f"batch[{key!r}] {x.shape}: {note}; replicated along them.")
  try:
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)
  except ValueError as e:
    raise ValueError(f"shard_batch: cannot place batch[{key!r}] of local shape {x.shape} "
                     f"with {spec}: {e}") from e


def shard_batch(batch: Mapping[str, Any], mesh: Mesh,
                batch_dims: Mapping[str, int | None] | None = None,
                rules: RulesLike = None) -> dict[str, Any]:
  """Host numpy batch (this process's slice) -> global jax arrays split over ('data', 'fsdp').

  Each process passes its own examples; arrays are concatenated across processes along their
  example dim (`jax.make_array_from_process_local_data`). `batch_dims` overrides
  DEFAULT_BATCH_DIMS per top-level key (applied to a nested dict's arrays as well). String
  arrays stay numpy. In a single process, an example dim the mesh doesn't divide is replicated.
  """
  rules = resolve_rules(rules)
  dims = {**DEFAULT_BATCH_DIMS, **(batch_dims or {})}
  out = {}
  for key, value in batch.items():
    dim = dims.get(key, 0)
    if isinstance(value, Mapping):
      out[key] = {k: _shard_array(f"{key}.{k}", v, mesh, dim, rules) for k, v in value.items()}
    else:
      out[key] = _shard_array(key, value, mesh, dim, rules)
  return out
