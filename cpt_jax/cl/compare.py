"""Compare continual runs (SFT vs RFT vs multi-task ...) from their report.json files.

  python -m cpt_jax.cl.compare RUN_DIR [RUN_DIR ...] --out DIR [--labels SFT GRPO ...]

Writes in DIR: comparison.md, comparison.csv, comparison.json (one row per run: AvgAcc, FM, BWT,
AAA, general-benchmark deltas; plus final accuracy per task) and comparison.png (grouped bars of
the metrics, and of the final accuracy per task). Runs are labelled by their method unless
--labels is given; runs sharing a method get their directory name appended.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cpt_jax.cl import report as report_lib

COMPARISON_MD = "comparison.md"
COMPARISON_CSV = "comparison.csv"
COMPARISON_JSON = "comparison.json"
COMPARISON_PNG = "comparison.png"

METRICS = (("avg_acc", "AvgAcc"), ("fm", "FM"), ("bwt", "BWT"), ("aaa", "AAA"))


def compare_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                 labels: Sequence[str] | None = None) -> dict[str, Any]:
  """Writes the comparison files in `out_dir`; returns the comparison.json content plus the
  Markdown table under "markdown"."""
  run_dirs = [os.fspath(d) for d in run_dirs]
  if not run_dirs:
    raise ValueError("no run directories to compare")
  missing = [d for d in run_dirs if not os.path.isfile(os.path.join(d, report_lib.REPORT_JSON))]
  if missing:
    raise FileNotFoundError(f"run directories without {report_lib.REPORT_JSON}: {missing} "
                            f"(write one with cpt_jax.cl.report.write_report)")
  if labels is not None and len(labels) != len(run_dirs):
    raise ValueError(f"{len(labels)} labels for {len(run_dirs)} run directories")
  reports = [report_lib.load_report(d) for d in run_dirs]
  labels = list(labels) if labels is not None else _labels(reports, run_dirs)
  if len(set(labels)) != len(labels):
    raise ValueError(f"run labels must be unique, got {labels}")

  tasks = _union(r["tasks"] for r in reports)
  benchmarks = _union(r.get("general", {}) for r in reports)
  rows = []
  for label, run_dir, rep in zip(labels, run_dirs, reports):
    row: dict[str, Any] = {"run": label, "method": rep["method"], "run_dir": run_dir,
                           "tasks": rep["tasks"], "num_trained": rep["num_trained"],
                           "num_tasks": rep["num_tasks"]}
    row.update({key: rep[key] for key, _ in METRICS})
    general = rep.get("general", {})
    row.update({f"delta_{b}": general[b]["delta"] if b in general else None for b in benchmarks})
    row["general_mean_delta"] = rep.get("general_mean_delta")
    row["final"] = {t: rep["final"].get(t) for t in tasks}
    rows.append(row)
  comparison = {"tasks": tasks, "benchmarks": benchmarks, "runs": rows}
  units = {label: report_lib.is_percent(rep["matrix"]) for label, rep in zip(labels, reports)}
  if len(set(units.values())) > 1:
    raise ValueError("runs mix accuracy units: percent for "
                     f"{[k for k, v in units.items() if v]}, fractions for "
                     f"{[k for k, v in units.items() if not v]}")
  percent = units[labels[0]]

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, COMPARISON_JSON), "w") as f:
    json.dump(comparison, f, indent=2, allow_nan=False)
  with open(os.path.join(out_dir, COMPARISON_CSV), "w", newline="") as f:
    f.write(_csv(rows, benchmarks, tasks))
  markdown = _markdown(rows, benchmarks, tasks, percent)
  with open(os.path.join(out_dir, COMPARISON_MD), "w") as f:
    f.write(markdown)
  _plot(rows, tasks, percent).savefig(os.path.join(out_dir, COMPARISON_PNG), dpi=110,
                                      bbox_inches="tight")
  return {**comparison, "markdown": markdown}


def _labels(reports: Sequence[dict[str, Any]], run_dirs: Sequence[str]) -> list[str]:
  methods = [r["method"] for r in reports]
  return [m if methods.count(m) == 1 else f"{m} ({os.path.basename(os.path.normpath(d))})"
          for m, d in zip(methods, run_dirs)]


def _untrained(row: dict[str, Any], tasks: Sequence[str]) -> list[str]:
  """Tasks of a partial run that come after its last trained task."""
  return [t for t in row["tasks"][row["num_trained"]:] if t in tasks]


def _union(groups) -> list[str]:
  """Names in order of first appearance across runs."""
  seen: dict[str, None] = {}
  for group in groups:
    seen.update(dict.fromkeys(group))
  return list(seen)


def _columns(benchmarks: Sequence[str]) -> list[tuple[str, str]]:
  """(row key, Markdown header) of the per-run numbers."""
  return ([*METRICS] + [(f"delta_{b}", f"Δ {b}") for b in benchmarks] +
          ([("general_mean_delta", "general mean Δ")] if benchmarks else []))


def _csv(rows: Sequence[dict[str, Any]], benchmarks: Sequence[str], tasks: Sequence[str]) -> str:
  keys = ["run", "method", "run_dir", "num_trained", "num_tasks",
          *(key for key, _ in _columns(benchmarks))]
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(keys + [f"final_{t}" for t in tasks])
  for row in rows:
    # Undefined numbers (FM of one task, a task a run lacks) are empty cells.
    writer.writerow([("" if row[k] is None else row[k]) for k in keys] +
                    [("" if row["final"][t] is None else row["final"][t]) for t in tasks])
  return out.getvalue()


def _markdown(rows: Sequence[dict[str, Any]], benchmarks: Sequence[str], tasks: Sequence[str],
              percent: bool) -> str:
  fmt = lambda v: report_lib.format_number(v, percent)
  columns = _columns(benchmarks)
  lines = ["# Continual post-training: run comparison", ""]
  lines += report_lib.markdown_table(
      ["run", "trained", *(header for _, header in columns)],
      [[row["run"], f"{row['num_trained']}/{row['num_tasks']}",
        *(fmt(row[key]) for key, _ in columns)] for row in rows]) + [""]
  lines += ["## Final accuracy per task", ""]
  lines += report_lib.markdown_table(["run", *tasks],
                                [[row["run"], *(fmt(row["final"][t]) for t in tasks)]
                                 for row in rows]) + [""]
  partial = [f"{row['run']}: {', '.join(_untrained(row, tasks))}" for row in rows
             if _untrained(row, tasks)]
  if partial:
    lines += ["Not trained yet (zero-shot accuracy above): " + "; ".join(partial) + ".", ""]
  lines += [f"![comparison]({COMPARISON_PNG})", ""]
  return "\n".join(lines)


def _grouped_bars(ax, groups: Sequence[str], rows: Sequence[dict[str, Any]], values,
                  hatched=lambda row: ()) -> None:
  """One cluster per group, one bar per run; values(row) -> [len(groups)] (None = no bar);
  bars whose group index is in hatched(row) are drawn hatched."""
  width = 0.8 / len(rows)
  x = np.arange(len(groups))
  for k, row in enumerate(rows):
    heights = np.array([np.nan if v is None else v for v in values(row)], np.float64)
    bars = ax.bar(x + (k - (len(rows) - 1) / 2) * width, np.nan_to_num(heights), width,
                  label=row["run"])
    for i in hatched(row):
      bars[i].set(hatch="//", alpha=0.5)
    ax.bar_label(bars, labels=["" if np.isnan(h) else f"{h:.3g}" for h in heights], fontsize=7)
  ax.set_xticks(x, groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4
                else "center")
  ax.axhline(0.0, color="black", lw=0.8)
  ax.grid(axis="y", alpha=0.3)


def _plot(rows: Sequence[dict[str, Any]], tasks: Sequence[str], percent: bool) -> Figure:
  metric_keys = [key for key, _ in METRICS] + (
      ["general_mean_delta"] if any(r["general_mean_delta"] is not None for r in rows) else [])
  metric_names = [name for _, name in METRICS] + (
      ["general Δ"] if "general_mean_delta" in metric_keys else [])
  fig = Figure(figsize=(6.0 + 0.9 * len(tasks) + 0.4 * len(rows), 4.6))
  ax_metrics, ax_tasks = fig.subplots(1, 2, width_ratios=[len(metric_keys), max(len(tasks), 2)])
  _grouped_bars(ax_metrics, metric_names, rows, lambda r: [r[k] for k in metric_keys])
  ax_metrics.set_title("continual-learning metrics")
  ax_metrics.set_ylabel("percent points" if percent else "accuracy (fraction)")
  _grouped_bars(ax_tasks, tasks, rows, lambda r: [r["final"][t] for t in tasks],
                hatched=lambda r: [i for i, t in enumerate(tasks) if t in _untrained(r, tasks)])
  ax_tasks.set_title("final accuracy per task (hatched: not trained yet)"
                     if any(_untrained(r, tasks) for r in rows) else "final accuracy per task")
  ax_tasks.set_ylim(0.0, 105.0 if percent else 1.05)
  ax_tasks.legend(title="run", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
  return fig


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m cpt_jax.cl.compare", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                      help="run directory holding report.json")
  parser.add_argument("--out", required=True, help="directory for the comparison files")
  parser.add_argument("--labels", nargs="+", help="one label per run (default: its method)")
  args = parser.parse_args(argv)
  try:
    comparison = compare_runs(args.run_dirs, args.out, args.labels)
  except (FileNotFoundError, ValueError) as e:
    parser.error(str(e))
  print(comparison["markdown"])
  print(f"wrote {len(comparison['runs'])} runs to {args.out}")


if __name__ == "__main__":
  main()
