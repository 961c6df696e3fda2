"""Report files of one continual run: JSON, CSV, Markdown and plots of the accuracy matrix.

`write_report(workdir, ...)` writes, in `workdir`:
  report.json            metrics from `cl.metrics.summarize` + method + config (+ the RFT fit)
  accuracy_matrix.csv    header `after_task,<task names>`, one row per trained task
  report.md              AvgAcc / FM / BWT / AAA, general-benchmark deltas, the matrix
  accuracy_matrix.png    annotated heat map (rows not yet trained are grey)
  task_accuracy.png      accuracy of every task after each training stage
  reward_var_vs_grad_norm.png   RFT runs only: within-group reward variance vs gradient norm
                         per step with a least-squares line. The paper's theory says the RFT
                         update is scaled by Var[r] (E[R(g_RFT)] ~ Var[r] R(g_SFT)).
The matrix is [T, T] (or [J, T], J <= T) with NaN rows for tasks not trained yet, so the loop
can rewrite the report after every task. Values are fractions or percent, as the matrix holds
them. Undefined numbers (FM of a single task) are `null` in JSON. Write from process 0 only.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import matplotlib
from matplotlib.figure import Figure

from cpt_jax.cl import metrics

REPORT_JSON = "report.json"
MATRIX_CSV = "accuracy_matrix.csv"
REPORT_MD = "report.md"
HEATMAP_PNG = "accuracy_matrix.png"
CURVES_PNG = "task_accuracy.png"
VARIANCE_PNG = "reward_var_vs_grad_norm.png"

# Step-metric names of the within-group reward variance (`rl.grpo.group_metrics` logs the second).
REWARD_VAR_KEYS = ("reward_var", "reward_var_within")
GRAD_NORM_KEY = "grad_norm"


def trained_rows(matrix: Any, num_tasks: int) -> np.ndarray:
  """The filled leading rows [J, T] of a [R, T] matrix whose later rows are all NaN."""
  a = np.asarray(matrix, np.float64)
  if a.ndim != 2 or a.shape[1] != num_tasks or a.shape[0] > num_tasks:
    raise ValueError(f"accuracy matrix must be [T, T] (or [J <= T, T]) for {num_tasks} tasks, "
                     f"got shape {a.shape}")
  filled = ~np.isnan(a).all(axis=1)  # [R]
  num_trained = int(filled.sum())
  if num_trained == 0:
    raise ValueError("accuracy matrix has no evaluated row; write the report after the first task")
  if not filled[:num_trained].all():
    raise ValueError(f"evaluated rows must come first, got evaluated rows "
                     f"{np.flatnonzero(filled).tolist()}")
  rows = a[:num_trained]
  if not np.isfinite(rows).all():
    bad = [tuple(int(k) for k in idx) for idx in np.argwhere(~np.isfinite(rows))]
    raise ValueError(f"evaluated rows have missing or non-finite entries at (row, task) {bad}")
  return rows


def variance_fit(step_metrics: Sequence[Mapping[str, Any]] | None) -> dict[str, Any] | None:
  """Least-squares grad_norm = slope * reward_var + intercept over the RFT steps, or None
  when no step logged a reward variance (SFT runs). slope/intercept/pearson_r are None when
  the variances do not vary (a line is not defined)."""
  var, norm = _variance_points(step_metrics)
  if var.size == 0:
    return None
  fit: dict[str, Any] = {"num_steps": int(var.size), "mean_reward_var": float(var.mean()),
                         "mean_grad_norm": float(norm.mean()), "slope": None, "intercept": None,
                         "pearson_r": None}
  if var.size >= 2 and np.ptp(var) > 0:
    slope, intercept = np.polyfit(var, norm, 1)
    fit.update(slope=float(slope), intercept=float(intercept))
    if np.ptp(norm) > 0:
      fit["pearson_r"] = float(np.corrcoef(var, norm)[0, 1])
  return fit


def write_report(workdir: str | os.PathLike, *, method: str, task_names: Sequence[str],
                 matrix: Any, general_before: Mapping[str, float] | None = None,
                 general_after: Mapping[str, float] | None = None,
                 step_metrics: Sequence[Mapping[str, Any]] | None = None,
                 config: Any = None) -> dict[str, Any]:
  """Writes the report files (module docstring) and returns the report.json content."""
  names = [str(n) for n in task_names]
  if len(set(names)) != len(names):
    raise ValueError(f"task names must be unique, got {names}")
  rows = trained_rows(matrix, len(names))  # [J, T]
  summary = metrics.summarize(rows, names, general_before, general_after)
  fit = variance_fit(step_metrics)
  plots = [HEATMAP_PNG, CURVES_PNG] + ([VARIANCE_PNG] if fit is not None else [])
  report = {"method": str(method), "num_tasks": len(names), **summary, "variance_fit": fit,
            "plots": plots, "config": _config_dict(config)}
  report = _jsonable(report)

  os.makedirs(workdir, exist_ok=True)
  _write_text(os.path.join(workdir, REPORT_JSON), json.dumps(report, indent=2, allow_nan=False))
  _write_text(os.path.join(workdir, MATRIX_CSV), _matrix_csv(rows, names))
  _write_text(os.path.join(workdir, REPORT_MD), _markdown(report, rows))
  _save(_heatmap(rows, names, method), os.path.join(workdir, HEATMAP_PNG))
  _save(_task_curves(rows, names, method), os.path.join(workdir, CURVES_PNG))
  if fit is not None:
    _save(_variance_scatter(*_variance_points(step_metrics), fit, method),
          os.path.join(workdir, VARIANCE_PNG))
  return report


def load_report(workdir: str | os.PathLike) -> dict[str, Any]:
  """The report.json of a run directory (null marks undefined numbers)."""
  path = os.path.join(workdir, REPORT_JSON)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"run directory {os.fspath(workdir)!r} has no {REPORT_JSON}")
  with open(path) as f:
    return json.load(f)


def format_number(value: float | None, percent: bool) -> str:
  """2 decimals for percent, 4 for fractions; 'n/a' for undefined."""
  if value is None or not math.isfinite(value):
    return "n/a"
  return f"{value:.2f}" if percent else f"{value:.4f}"


def is_percent(values: Any) -> bool:
  """Accuracies above 1 mean the numbers are percent, not fractions."""
  a = np.asarray(values, np.float64)
  return bool(np.nanmax(np.abs(a), initial=0.0) > 1.0)


# ----------------------------------------------------------------------------- text files

def _jsonable(obj: Any) -> Any:
  """Non-finite floats -> None (standard JSON); numpy scalars -> Python numbers."""
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def _config_dict(config: Any) -> Any:
  """A ConfigDict, dataclass or mapping as plain JSON values (unknown leaves as strings)."""
  if config is None:
    return None
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  elif dataclasses.is_dataclass(config) and not isinstance(config, type):
    config = dataclasses.asdict(config)
  return json.loads(json.dumps(_jsonable(config), default=str))


def _write_text(path: str, text: str) -> None:
  """Write-then-rename, so a reader never sees half a report."""
  tmp = path + ".tmp"
  with open(tmp, "w", newline="") as f:
    f.write(text)
  os.replace(tmp, path)


def _matrix_csv(rows: np.ndarray, names: list[str]) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["after_task", *names])
  for j, row in enumerate(rows):
    writer.writerow([names[j], *(repr(float(v)) for v in row)])
  return out.getvalue()


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
  """Lines of a GitHub Markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in body]
  return lines


def _markdown(report: Mapping[str, Any], rows: np.ndarray) -> str:
  names = report["tasks"]
  percent = is_percent(rows)
  fmt = lambda v: format_number(v, percent)
  num_trained, num_tasks = report["num_trained"], report["num_tasks"]
  lines = [f"# Continual post-training report: {report['method']}", ""]
  status = "complete" if num_trained == num_tasks else "in progress"
  lines += [f"Trained {num_trained} of {num_tasks} tasks ({status}); metrics cover the "
            f"{num_trained} tasks seen. Accuracy unit: {'percent' if percent else 'fraction'}.",
            ""]
  lines += ["## Metrics", ""]
  metric_rows = [["AvgAcc", fmt(report["avg_acc"])], ["FM", fmt(report["fm"])],
                 ["BWT", fmt(report["bwt"])], ["AAA", fmt(report["aaa"])]]
  if "general" in report:
    metric_rows.append(["General mean delta", fmt(report["general_mean_delta"])])
  lines += markdown_table(["metric", "value"], metric_rows) + [""]
  if "general" in report:
    lines += ["## General benchmarks", ""]
    lines += markdown_table(["benchmark", "before", "after", "delta"],
                       [[name, fmt(d["before"]), fmt(d["after"]), fmt(d["delta"])]
                        for name, d in report["general"].items()]) + [""]
  lines += ["## Accuracy matrix", "", "Row: after training that task; column: evaluated task.", ""]
  lines += markdown_table(["after \\ on", *names],
                     [[names[j], *(fmt(v) for v in row)] for j, row in enumerate(rows)]) + [""]
  if report["forgetting"]:
    lines += ["## Forgetting per task", "",
              "Final accuracy minus the best earlier accuracy (negative = forgot).", ""]
    lines += markdown_table(["task", "forgetting"],
                       [[name, fmt(v)] for name, v in report["forgetting"].items()]) + [""]
  fit = report["variance_fit"]
  if fit is not None:
    lines += ["## RFT: reward variance vs gradient norm", ""]
    lines += markdown_table(["steps", "mean reward var", "mean grad norm", "slope", "intercept",
                        "pearson r"],
                       [[str(fit["num_steps"])] + [format_number(fit[k], False) for k in (
                           "mean_reward_var", "mean_grad_norm", "slope", "intercept",
                           "pearson_r")]]) + [""]
  lines += ["## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]] + [""]
  return "\n".join(lines)


# ----------------------------------------------------------------------------- plots

def _save(fig: Figure, path: str) -> None:
  # A bare Figure renders with the Agg canvas: no pyplot state, no global backend switch.
  tmp = path + ".tmp"
  fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
  os.replace(tmp, path)


def _heatmap(rows: np.ndarray, names: list[str], method: str) -> Figure:
  num_trained, num_tasks = rows.shape
  percent = is_percent(rows)
  full = np.full((num_tasks, num_tasks), np.nan)
  full[:num_trained] = rows
  size = 1.6 + 0.75 * num_tasks
  fig = Figure(figsize=(size + 1.5, size))
  ax = fig.add_subplot()
  cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
  vmax = 100.0 if percent else 1.0
  image = ax.imshow(np.ma.masked_invalid(full), cmap=cmap, vmin=0.0, vmax=vmax)
  for j in range(num_trained):
    for i in range(num_tasks):
      value = rows[j, i]
      color = "white" if value < 0.5 * vmax else "black"
      ax.text(i, j, f"{value:.1f}" if percent else f"{value:.2f}", ha="center", va="center",
              color=color, fontsize=8, fontweight="bold" if i == j else "normal")
  ax.set_xticks(range(num_tasks), names, rotation=45, ha="right")
  ax.set_yticks(range(num_tasks), names)
  ax.set_xlabel("evaluated task")
  ax.set_ylabel("after training task")
  title = f"{method}: accuracy matrix"
  if num_trained < num_tasks:
    title += f" ({num_trained}/{num_tasks} trained)"
  ax.set_title(title)
  fig.colorbar(image, ax=ax, label="accuracy" + (" (%)" if percent else ""))
  return fig


def _task_curves(rows: np.ndarray, names: list[str], method: str) -> Figure:
  num_trained, num_tasks = rows.shape
  fig = Figure(figsize=(max(6.0, 1.0 + 0.9 * num_tasks), 4.2))
  ax = fig.add_subplot()
  stages = np.arange(num_trained)
  for i, name in enumerate(names):
    (line,) = ax.plot(stages, rows[:, i], marker="o", markersize=4, label=name)
    if i < num_trained:  # star: the task's accuracy right after training on it
      ax.plot([i], [rows[i, i]], marker="*", markersize=12, color=line.get_color())
  ax.set_xticks(range(num_tasks), [f"after {n}" for n in names], rotation=30, ha="right")
  ax.set_xlim(-0.3, num_tasks - 0.7)
  ax.set_ylim(0.0, 100.0 if is_percent(rows) else 1.0)
  ax.set_xlabel("training stage")
  ax.set_ylabel("accuracy")
  ax.set_title(f"{method}: accuracy of each task across the sequence (star: just trained)")
  ax.grid(alpha=0.3)
  ax.legend(title="task", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
  return fig


def _variance_points(step_metrics: Sequence[Mapping[str, Any]] | None
                     ) -> tuple[np.ndarray, np.ndarray]:
  """([N] reward variance, [N] grad norm) of the steps that logged a reward variance."""
  var, norm = [], []
  for k, step in enumerate(step_metrics or ()):
    key = next((name for name in REWARD_VAR_KEYS if name in step), None)
    if key is None:
      continue
    if GRAD_NORM_KEY not in step:
      raise ValueError(f"step_metrics[{k}] has {key!r} but no {GRAD_NORM_KEY!r}")
    var.append(float(np.asarray(step[key])))
    norm.append(float(np.asarray(step[GRAD_NORM_KEY])))
  var_a, norm_a = np.asarray(var, np.float64), np.asarray(norm, np.float64)
  keep = np.isfinite(var_a) & np.isfinite(norm_a)  # skipped (non-finite) steps carry no signal
  return var_a[keep], norm_a[keep]


def _variance_scatter(var: np.ndarray, norm: np.ndarray, fit: Mapping[str, Any],
                      method: str) -> Figure:
  fig = Figure(figsize=(6.4, 4.6))
  ax = fig.add_subplot()
  points = ax.scatter(var, norm, c=np.arange(var.size), cmap="plasma", s=14, alpha=0.8)
  fig.colorbar(points, ax=ax, label="step (order logged)")
  if fit["slope"] is not None:
    xs = np.linspace(var.min(), var.max(), 2)
    label = f"fit: {fit['slope']:.3g} * var + {fit['intercept']:.3g}"
    if fit["pearson_r"] is not None:
      label += f" (r = {fit['pearson_r']:.2f})"
    ax.plot(xs, fit["slope"] * xs + fit["intercept"], color="black", lw=1.5, label=label)
    ax.legend(loc="upper left", fontsize=8)
  ax.set_xlabel("mean within-group reward variance Var[r]")
  ax.set_ylabel("gradient norm")
  ax.set_title(f"{method}: RFT update size vs reward variance")
  ax.grid(alpha=0.3)
  return fig
