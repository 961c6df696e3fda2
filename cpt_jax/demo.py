"""The demo: does continual SFT forget more than continual RFT? One command, CPU, no download.

    python -m cpt_jax.demo --workdir=/tmp/cpt_demo

Builds the synthetic seven-task benchmark, trains a tiny tokenizer and a small
Qwen2.5-VL-shaped model (base: multitask SFT on the seven tasks + 'general'), then runs
continual SFT and continual RFT over the seven tasks from that base (configs/demo/default.py
says how), and writes in the workdir:
  base/, sft/, rft/        the three 'cpt' runs (report.md, accuracy_matrix.png, ... each)
  comparison.{md,csv,json,png}   cl.compare of the continual runs
  DEMO.md                  the table (AvgAcc, FM, BWT, 'general' before/after), what it shows,
                           and the run's wall and CPU time.
A rerun with the same workdir resumes where it stopped (every run is resumable).
"""
from __future__ import annotations

import os
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any

from absl import app, flags
import jax
from ml_collections import config_flags

from cpt_jax.cl import compare
from cpt_jax.cl import loop
from cpt_jax.cl import report as report_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "demo", "default.py")
DEMO_MD = "DEMO.md"
# |FM| differences below this many accuracy points are read as "no clear difference": with
# 64 test prompts per task one answer is 1.6 points, and FM averages six tasks.
MARGIN = 0.02


def _cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def run_demo(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the base and continual runs of `config`; returns the comparison, the
  reading and the timings (also written to DEMO.md)."""
  t0, cpu0, load0 = time.perf_counter(), _cpu_seconds(), os.getloadavg()[0]
  os.makedirs(workdir, exist_ok=True)
  if config.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  base_dir = os.path.join(workdir, "base")
  data_dir = config.base.data.dir or os.path.join(workdir, "data")
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.base.data.dir = data_dir
  _banner(f"base model: {config.base.method} SFT on {', '.join(config.base.tasks)}")
  base = loop.run(config.base, base_dir)
  timings = {"base": time.perf_counter() - t0}

  run_dirs = {}
  for label in config.order:
    run_config = config.runs[label].copy_and_resolve_references()
    with run_config.unlocked():
      run_config.init.workdir = base_dir
      run_config.data.dir = run_config.data.dir or data_dir
      if not run_config.tokenizer.path:
        run_config.tokenizer.path = os.path.join(base_dir, "tokenizer")
    _banner(f"continual {label} ({run_config.method}) over {', '.join(run_config.tasks)}")
    t = time.perf_counter()
    run_dirs[label] = os.path.join(workdir, label)
    loop.run(run_config, run_dirs[label])
    timings[label] = time.perf_counter() - t

  comparison = compare.compare_runs(list(run_dirs.values()), workdir, labels=list(run_dirs))
  reports = {label: report_lib.load_report(d) for label, d in run_dirs.items()}
  timings.update(total=time.perf_counter() - t0, cpu=_cpu_seconds() - cpu0)
  text = demo_markdown(base, reports, comparison, timings, (load0, os.getloadavg()[0]))
  with open(os.path.join(workdir, DEMO_MD), "w") as f:
    f.write(text)
  return {"comparison": comparison, "reports": reports, "timings": timings, "markdown": text}


def _banner(message: str) -> None:
  print(f"\n=== {message}", flush=True)


def _fmt(value: float | None) -> str:
  return report_lib.format_number(value, percent=False)


def reading(reports: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """What the numbers say about SFT vs RFT forgetting, in plain sentences."""
  if not {"sft", "rft"} <= set(reports):
    return []
  sft, rft = reports["sft"], reports["rft"]
  lines = []
  if sft["fm"] is not None and rft["fm"] is not None:
    gap = rft["fm"] - sft["fm"]
    if gap > MARGIN:
      lines.append(f"SFT forgot more than RFT: FM {_fmt(sft['fm'])} vs {_fmt(rft['fm'])} "
                   "(the paper's finding).")
    elif gap < -MARGIN:
      lines.append(f"RFT forgot more than SFT here: FM {_fmt(rft['fm'])} vs {_fmt(sft['fm'])}; "
                   "the paper's finding is not reproduced at this scale.")
    else:
      lines.append(f"No clear difference in forgetting: FM SFT {_fmt(sft['fm'])}, RFT "
                   f"{_fmt(rft['fm'])} (within {MARGIN})."
                   " The paper's finding is not shown at this scale.")
  plasticity = {k: sum(r["matrix"][i][i] for i in range(r["num_trained"])) / r["num_trained"]
                for k, r in (("sft", sft), ("rft", rft))}
  lines.append(f"Plasticity (mean accuracy on each task right after training it): SFT "
               f"{_fmt(plasticity['sft'])}, RFT {_fmt(plasticity['rft'])}; forgetting only "
               "means something next to how much was learnt.")
  if "general" in sft and "general" in rft:
    for name in sft["general"]:
      s, r = sft["general"][name], rft["general"].get(name)
      if r is None:
        continue
      lines.append(f"Held-out '{name}' (base skill): SFT {_fmt(s['before'])} -> "
                   f"{_fmt(s['after'])}, RFT {_fmt(r['before'])} -> {_fmt(r['after'])}.")
  return lines


def demo_markdown(base: Mapping[str, Any], reports: Mapping[str, Mapping[str, Any]],
                  comparison: Mapping[str, Any], timings: Mapping[str, float],
                  load: tuple[float, float]) -> str:
  header = ["run", "AvgAcc", "FM", "BWT", "general before", "general after"]
  body = []
  for label, r in reports.items():
    general = r.get("general", {})
    before = ", ".join(_fmt(g["before"]) for g in general.values()) or "n/a"
    after = ", ".join(_fmt(g["after"]) for g in general.values()) or "n/a"
    body.append([label, _fmt(r["avg_acc"]), _fmt(r["fm"]), _fmt(r["bwt"]), before, after])
  lines = ["# Demo: continual SFT vs continual RFT (synthetic seven tasks, CPU)", ""]
  lines += report_lib.markdown_table(header, body) + [""]
  lines += [f"Base model (multitask SFT) accuracy per task: " + ", ".join(
      f"{t} {_fmt(v)}" for t, v in base["final"].items()) + ".", ""]
  lines += ["## Reading", ""] + [f"- {line}" for line in reading(reports)] + [""]
  lines += ["## Per run", ""] + [f"- {label}: [{label}/report.md]({label}/report.md)"
                                  for label in reports] + [""]
  lines += [comparison["markdown"], ""]
  lines += ["## Time", "",
            "Wall seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()
                                         if k != "cpu") +
            f"; CPU seconds of this process {timings['cpu']:.0f}; load average at start "
            f"{load[0]:.1f}, at end {load[1]:.1f} (on {os.cpu_count()} cores).", ""]
  return "\n".join(lines)


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = flags.FLAGS.workdir
  if not workdir:
    raise app.UsageError("--workdir is required")
  result = run_demo(flags.FLAGS.config, workdir)
  print("\n" + result["markdown"], flush=True)
  print(f"wrote {os.path.join(workdir, DEMO_MD)}", flush=True)


def run() -> None:
  # Defined here, not at import: cpt_jax.main defines its own --config.
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Demo config (.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for the runs and the comparison.")
  # Config files import `configs.common` from the repository root.
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  app.run(main)


if __name__ == "__main__":
  run()
