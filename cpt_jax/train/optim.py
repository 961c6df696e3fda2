"""Optimizer, train state and the update-or-skip rule shared by every trainer.

Every trainer (SFT, RFT, ParetoCL) keeps its weights in a `TrainState` and applies its
gradients with `apply_gradients_or_skip`; only the loss differs. Master weights and
optimizer state are float32; `cast_floating` makes the low-precision copy for the forward.

Config (`config.optim`):
  name: 'adamw' | 'sgd'.
  lr: peak learning rate (paper: SFT 1e-5, RFT 1e-6).
  schedule: 'cosine' (linear warmup, cosine to 0) | 'constant' (linear warmup, then flat).
  warmup_ratio: warmup steps = ceil(warmup_ratio * total optimizer steps).
  b1, b2, eps, weight_decay: AdamW; momentum: SGD.
  grad_clip_norm: global-norm clip of the trainable gradients (None or 0: off).
  grad_accum_steps: micro-batches per optimizer update (optax.MultiSteps).
  freeze: regexes; a parameter whose path ('visual/blocks/0/attn/qkv/kernel') starts
    with a whole-component match of one of them gets no update at all (bit-identical).
"""
from __future__ import annotations

import math
import re
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any

TRAIN, FROZEN = "train", "frozen"


def param_path(path) -> str:
  """Key path of a parameter as 'a/b/0/c' (the form `freeze` patterns match)."""
  parts = []
  for key in path:
    for attr in ("key", "idx", "name"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def trainable_mask(params: PyTree, freeze: tuple[str, ...] | list[str] = ()) -> PyTree:
  """True for parameters that train, False for those a `freeze` pattern covers.

  A pattern must match whole leading components of the path: 'visual' freezes
  'visual/...' but not 'visual_proj/...'. A pattern matching nothing is an error,
  so a typo cannot silently train what was meant to stay frozen.
  """
  compiled = [re.compile(f"(?:{p})(?:/.*)?") for p in freeze]
  used = [False] * len(compiled)

  def is_trainable(path, _):
    name = param_path(path)
    hit = False
    for i, pattern in enumerate(compiled):
      if pattern.fullmatch(name):
        used[i] = hit = True
    return not hit

  mask = jax.tree_util.tree_map_with_path(is_trainable, params)
  unused = [p for p, u in zip(freeze, used) if not u]
  if unused:
    some = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)[:5]]
    raise ValueError(f"optim.freeze patterns {unused} match no parameter; paths look like {some}")
  return mask


def make_schedule(config, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the optimizer-update count."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  if not 0.0 <= config.warmup_ratio < 1.0:
    raise ValueError(f"optim.warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
  warmup = math.ceil(config.warmup_ratio * total_steps)
  if config.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
        decay_steps=total_steps, end_value=0.0)
  if config.schedule == "constant":
    if warmup == 0:
      return optax.constant_schedule(config.lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.lr, warmup), optax.constant_schedule(config.lr)],
        [warmup])
  raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {config.schedule!r}")


class Optimizer(NamedTuple):
  """What a train step needs besides the state: the transform and two static facts."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule  # lr at optimizer-update count
  trainable: PyTree         # bools like params (static, not traced)
  accum_steps: int


def make_optimizer(config, params: PyTree, total_steps: int) -> Optimizer:
  """AdamW/SGD with schedule, clipping and accumulation on the trainable params only.

  `total_steps` counts optimizer updates (micro-batches / grad_accum_steps).
  """
  schedule = make_schedule(config, total_steps)
  if config.name == "adamw":
    base = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                       weight_decay=config.weight_decay)
  elif config.name == "sgd":
    base = optax.sgd(schedule, momentum=config.momentum or None)
  else:
    raise ValueError(f"optim.name must be 'adamw' or 'sgd', got {config.name!r}")
  if config.grad_clip_norm:
    base = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), base)
  accum = int(config.grad_accum_steps)
  if accum < 1:
    raise ValueError(f"optim.grad_accum_steps must be >= 1, got {accum}")
  if accum > 1:
    base = optax.MultiSteps(base, every_k_schedule=accum)
  trainable = trainable_mask(params, tuple(config.freeze))
  labels = jax.tree.map(lambda t: TRAIN if t else FROZEN, trainable)
  # Frozen parameters get exact zeros (no weight decay either), so they stay
  # bit-identical, and the Adam moments exist for the trainable ones only.
  tx = optax.multi_transform({TRAIN: base, FROZEN: optax.set_to_zero()}, labels)
  return Optimizer(tx, schedule, trainable, accum)


@flax.struct.dataclass
class TrainState:
  """Everything a trainer updates and a checkpoint restores (a pytree of arrays)."""
  step: jax.Array       # int32 []: micro-batches consumed, skipped ones included
  params: PyTree        # float32 master weights (pure dict, like nnx.to_pure_dict)
  opt_state: PyTree
  rng: jax.Array        # uint32 [2]: the trainer's randomness (e.g. rollouts)
  skipped: jax.Array    # int32 []: updates dropped for a non-finite loss or gradient


def create_train_state(params: PyTree, optimizer: Optimizer, rng: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.tx.init(params), rng=rng,
                    skipped=jnp.zeros((), jnp.int32))


def state_shardings(abstract: TrainState, param_shardings: PyTree, replicated) -> TrainState:
  """Shardings for a TrainState: an optimizer-state leaf whose key path ends with a
  parameter's path and has its shape (Adam moments, accumulated gradients) follows
  that parameter; counters and everything else are `replicated`."""
  by_path = {}
  for (path, sh), leaf in zip(jax.tree_util.tree_leaves_with_path(param_shardings),
                              jax.tree.leaves(abstract.params)):
    by_path[tuple(param_path(path).split("/"))] = (leaf.shape, sh)

  def pick(path, leaf):
    keys = tuple(param_path(path).split("/"))
    for i in range(len(keys)):
      shape, sh = by_path.get(keys[i:], (None, None))
      if sh is not None and shape == leaf.shape:
        return sh
    return replicated

  opt = jax.tree_util.tree_map_with_path(pick, abstract.opt_state)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt,
                    rng=replicated, skipped=replicated)


def cast_floating(tree: PyTree, dtype) -> PyTree:
  """Casts floating leaves to `dtype` (the compute copy of float32 master weights)."""
  if dtype is None:
    return tree
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def with_remat(loss_fn, remat_policy: str | None):
  """`loss_fn` under jax.checkpoint with the `jax.checkpoint_policies` entry `remat_policy`
  (e.g. 'dots_with_no_batch_dims_saveable'); unchanged when it is empty."""
  if not remat_policy:
    return loss_fn
  policy = getattr(jax.checkpoint_policies, remat_policy, None)
  if policy is None:
    raise ValueError(f"unknown remat_policy {remat_policy!r}; see jax.checkpoint_policies")
  return jax.checkpoint(loss_fn, policy=policy)


def current_lr(state: TrainState, optimizer: Optimizer) -> jax.Array:
  """The learning rate the next finite update of `state` uses."""
  return optimizer.schedule((state.step - state.skipped) // optimizer.accum_steps)


def apply_gradients_or_skip(state: TrainState, grads: PyTree, loss: jax.Array,
                            optimizer: Optimizer) -> tuple[TrainState, dict]:
  """Applies `grads`, unless the loss or a trainable gradient is NaN/inf.

  A skipped step leaves params and optimizer state bit-identical, counts in
  `state.skipped` and still advances `state.step` (the batch was consumed).
  Frozen gradients are dropped before any reduction, so XLA need not compute them.
  """
  grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, optimizer.trainable)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  lr = current_lr(state, optimizer)

  def update(params, opt_state):
    updates, new_opt_state = optimizer.tx.update(grads, opt_state, params)
    # Frozen leaves are passed through untouched (p + 0 would turn -0.0 into +0.0).
    new_params = jax.tree.map(lambda p, u, t: (p + u).astype(p.dtype) if t else p,
                              params, updates, optimizer.trainable)
    return new_params, new_opt_state

  # A branch, not a select between old and new: a skipped update costs nothing and a taken
  # one no extra pass over the weights and moments.
  params, opt_state = jax.lax.cond(finite, update, lambda p, o: (p, o), state.params,
                                   state.opt_state)
  skip = (~finite).astype(jnp.int32)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            skipped=state.skipped + skip)
  return new_state, {"grad_norm": grad_norm, "lr": lr, "skipped": skip,
                     "skipped_total": new_state.skipped}
