"""Continual-learning metrics over the accuracy matrix (papers.md, "Metrics").

a[j, i] is the accuracy on task i after training on task j (0-indexed here; the papers count from
1, so their a[T] is row T - 1). With T tasks trained:
  AvgAcc = mean_i a[T-1, i]
  FM     = mean_{i < T-1} (a[T-1, i] - max_{j < T-1} a[j, i])   (max excludes the final row;
                                                                 negative = forgot)
  BWT    = mean_{i < T-1} (a[T-1, i] - a[i, i])
  AAA    = mean_j mean_{i <= j} a[j, i]                          (ParetoCL)
A matrix with J < T rows (training still under way) is scored on its leading J x J block, the
tasks seen so far. FM and BWT of a single task are NaN (nothing to forget). Units are whatever
the matrix holds (fractions or percent).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def accuracy_matrix(evals: Sequence[Mapping[str, float]], task_names: Sequence[str]) -> np.ndarray:
  """Stacks per-stage evaluations into a [J, T] matrix; evals[j][name] = accuracy after task j."""
  rows = []
  for j, row in enumerate(evals):
    missing = [name for name in task_names if name not in row]
    if missing:
      raise ValueError(f"evaluation after task {j} lacks tasks {missing}")
    rows.append([float(row[name]) for name in task_names])
  return _check(np.asarray(rows, np.float64).reshape(len(rows), len(task_names)))


def _check(matrix: Any) -> np.ndarray:
  a = np.asarray(matrix, np.float64)
  if a.ndim != 2 or a.shape[0] < 1 or a.shape[0] > a.shape[1]:
    raise ValueError(f"accuracy matrix must be [J trained, T tasks] with 1 <= J <= T, got shape "
                     f"{a.shape}")
  if not np.isfinite(a).all():
    bad = [tuple(int(k) for k in idx) for idx in np.argwhere(~np.isfinite(a))]
    raise ValueError(f"accuracy matrix has non-finite entries at (row, task) {bad}")
  return a


def _seen(matrix: Any) -> np.ndarray:
  """The leading J x J block: rows trained so far, tasks seen so far."""
  a = _check(matrix)
  return a[:, :a.shape[0]]


def avg_acc(matrix: Any) -> float:
  a = _seen(matrix)
  return float(a[-1].mean())


def forgetting_per_task(matrix: Any) -> np.ndarray:
  """[J - 1]: a[last, i] - max_{j < last} a[j, i] for the tasks before the last."""
  a = _seen(matrix)
  last = a.shape[0] - 1
  return a[last, :last] - a[:last, :last].max(axis=0, initial=-np.inf)


def forgetting(matrix: Any) -> float:
  per_task = forgetting_per_task(matrix)
  return float(per_task.mean()) if per_task.size else float("nan")


def backward_transfer(matrix: Any) -> float:
  a = _seen(matrix)
  last = a.shape[0] - 1
  if last == 0:
    return float("nan")
  return float((a[last, :last] - np.diag(a)[:last]).mean())


def average_anytime_accuracy(matrix: Any) -> float:
  a = _seen(matrix)
  return float(np.mean([a[j, :j + 1].mean() for j in range(a.shape[0])]))


def general_deltas(before: Mapping[str, float], after: Mapping[str, float]
                   ) -> dict[str, dict[str, float]]:
  """{benchmark: {before, after, delta = after - before}} for general-knowledge benchmarks."""
  if set(before) != set(after):
    raise ValueError(f"general benchmarks differ: before has {sorted(before)}, after has "
                     f"{sorted(after)}")
  return {name: {"before": float(before[name]), "after": float(after[name]),
                 "delta": float(after[name]) - float(before[name])} for name in sorted(before)}


def summarize(matrix: Any, task_names: Sequence[str] | None = None,
              general_before: Mapping[str, float] | None = None,
              general_after: Mapping[str, float] | None = None) -> dict[str, Any]:
  """All metrics of a run, JSON-ready: avg_acc, fm, bwt, aaa, per-task final accuracy and
  forgetting, the matrix, and general-benchmark deltas (with their mean) when both are given."""
  a = _check(matrix)
  num_trained, num_tasks = a.shape
  names = list(task_names) if task_names is not None else [f"task{i}" for i in range(num_tasks)]
  if len(names) != num_tasks:
    raise ValueError(f"{len(names)} task names for a matrix with {num_tasks} tasks")
  summary: dict[str, Any] = {
      "tasks": names,
      "num_trained": num_trained,
      "avg_acc": avg_acc(a),
      "fm": forgetting(a),
      "bwt": backward_transfer(a),
      "aaa": average_anytime_accuracy(a),
      "final": {name: float(a[-1, i]) for i, name in enumerate(names)},
      "forgetting": {names[i]: float(f) for i, f in enumerate(forgetting_per_task(a))},
      "matrix": a.tolist(),
  }
  if (general_before is None) != (general_after is None):
    raise ValueError("pass both general_before and general_after, or neither")
  if general_before is not None:
    deltas = general_deltas(general_before, general_after)
    summary["general"] = deltas
    summary["general_mean_delta"] = (float(np.mean([d["delta"] for d in deltas.values()]))
                                     if deltas else float("nan"))
  return summary
