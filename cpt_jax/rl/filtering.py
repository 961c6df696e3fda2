"""RIF-RFT: rollout-based instance filtering (host-side numpy).

Offline (the paper): before RFT on a task, grade n rollouts per training instance with the
current model and drop the instances it cannot solve at all (0 of n; `drop_all_wrong`) and,
optionally, those it always solves (n of n; `drop_all_right`, whose zero reward variance gives
zero GRPO gradient). Online (DAPO-style extension): inside each rollout batch drop the groups
whose mean score is <= low or >= high, and refill from further rollout batches.
"""
from __future__ import annotations

import enum
from typing import Any

import jax
import numpy as np


class FilterMode(enum.StrEnum):
  NONE = "none"
  OFFLINE = "offline"
  ONLINE = "online"

  @classmethod
  def parse(cls, value: str | FilterMode) -> FilterMode:
    try:
      return cls(value)
    except ValueError:
      raise ValueError(f"unknown instance filter {value!r}; choose from "
                       f"{[m.value for m in cls]}") from None


def filter_instances(correct: Any, drop_all_wrong: bool = True, drop_all_right: bool = False
                     ) -> tuple[np.ndarray, dict[str, Any]]:
  """Offline RIF-RFT. correct: [N, n] bool (or 0/1), rollout k of instance i graded correct.

  Returns (keep [N] bool, stats): num_instances, num_kept, kept_fraction, num_all_wrong,
  num_all_right, mean_pass_rate, and pass_count_hist[k] = instances with k of n correct.
  """
  correct = np.asarray(correct)
  if correct.ndim != 2 or correct.shape[1] == 0:
    raise ValueError(f"correct must be [N instances, n rollouts] with n >= 1, got shape "
                     f"{correct.shape}")
  if correct.dtype != bool:
    if correct.size and not np.isin(correct, (0, 1)).all():
      raise ValueError("correct must hold booleans or 0/1 values; threshold scores first "
                       "(e.g. accuracy > 0.5)")
    correct = correct.astype(bool)
  num_instances, num_rollouts = correct.shape
  pass_count = correct.sum(axis=1)  # [N]
  all_wrong = pass_count == 0
  all_right = pass_count == num_rollouts
  keep = np.ones(num_instances, bool)
  if drop_all_wrong:
    keep &= ~all_wrong
  if drop_all_right:
    keep &= ~all_right
  stats = {
      "num_instances": num_instances,
      "num_kept": int(keep.sum()),
      "kept_fraction": float(keep.sum() / max(num_instances, 1)),
      "num_all_wrong": int(all_wrong.sum()),
      "num_all_right": int(all_right.sum()),
      "mean_pass_rate": float(correct.mean()) if correct.size else 0.0,
      "pass_count_hist": np.bincount(pass_count, minlength=num_rollouts + 1).tolist(),
  }
  return keep, stats


def filter_groups(scores: Any, low: float = 0.01, high: float = 0.99) -> np.ndarray:
  """Online filter. scores: [B, G] per-response scores in [0, 1]; keep [B] = low < mean < high.

  Pass accuracies to drop all-wrong / all-right groups: with the 0.9/0.1 mixed reward an
  all-wrong but well-formatted group has mean 0.1 and would be kept.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2:
    raise ValueError(f"scores must be [B groups, G responses], got shape {scores.shape}")
  if not low < high:
    raise ValueError(f"need low < high, got low={low}, high={high}")
  mean = scores.mean(axis=1)
  return (mean > low) & (mean < high)


class GroupRefill:
  """Accumulates kept groups across rollout batches until `target` groups are ready.

  `add(groups, keep)` takes a pytree of numpy arrays whose leading axis is the group axis [B, ...]
  and keep [B]; `pop()` returns exactly `target` groups in arrival order and discards the rest
  (extra groups would be stale, off-policy rollouts by the next update, as in DAPO).
  `max_batches` bounds the rollout batches one `pop` may consume: a task the model always or
  never solves would otherwise loop forever.
  """

  def __init__(self, target: int, max_batches: int | None = None):
    if target < 1:
      raise ValueError(f"target must be >= 1 groups, got {target}")
    if max_batches is not None and max_batches < 1:
      raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
    self.target = target
    self.max_batches = max_batches
    self._parts: list[Any] = []
    self.num_kept = 0
    self.num_seen = 0
    self.num_batches = 0

  @property
  def ready(self) -> bool:
    return self.num_kept >= self.target

  def add(self, groups: Any, keep: Any) -> None:
    keep = np.asarray(keep, bool)
    leaves = jax.tree.leaves(groups)
    if keep.ndim != 1 or any(np.shape(leaf)[:1] != keep.shape for leaf in leaves):
      raise ValueError(f"every array in groups needs leading axis B = len(keep) = {keep.shape}; "
                       f"got {[np.shape(leaf) for leaf in leaves]}")
    self.num_batches += 1
    self.num_seen += keep.shape[0]
    if keep.any():
      self._parts.append(jax.tree.map(lambda x: np.asarray(x)[keep], groups))
      self.num_kept += int(keep.sum())
    if not self.ready and self.max_batches is not None and self.num_batches >= self.max_batches:
      raise RuntimeError(f"online filter kept {self.num_kept} of {self.num_seen} groups in "
                         f"{self.num_batches} rollout batches, short of {self.target}: the task "
                         "is (almost) always or never solved; raise max_batches or filter offline")

  def pop(self) -> tuple[Any, dict[str, Any]]:
    """(the first `target` kept groups, fill stats); resets the accumulator for the next update."""
    if not self.ready:
      raise ValueError(f"only {self.num_kept} of {self.target} groups are ready")
    merged = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0)[:self.target], *self._parts)
    stats = {
        "num_batches": self.num_batches,
        "num_seen": self.num_seen,
        "num_kept": self.num_kept,
        "kept_fraction": self.num_kept / self.num_seen,
        "num_discarded": self.num_kept - self.target,
    }
    self._parts = []
    self.num_kept = self.num_seen = self.num_batches = 0
    return merged, stats
