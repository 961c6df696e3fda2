"""The demo: does continual SFT forget more than continual RFT? One command, CPU, no download.

    python -m cpt_jax.demo --workdir=/tmp/cpt_demo

Builds the synthetic seven-task benchmark, trains a tiny tokenizer and a small
Qwen2.5-VL-shaped model (base: multitask SFT on the seven tasks + 'general'), then runs
continual SFT and continual RFT over the seven tasks from that base, plus the two
learning-rate controls (configs/demo/default.py says how), and writes in the workdir:
  base/, sft/, rft/, ...         the 'cpt' runs (report.md, accuracy_matrix.png, ... each)
  comparison.{md,csv,json,png}   cl.compare of the continual runs
  DEMO.md                        the table (AvgAcc, FM, BWT, learning gain, 'general' before
                                 and after), a reading of it, and the wall and CPU time.
A rerun with the same workdir resumes where it stopped (every run is resumable).
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Mapping
from typing import Any

from absl import app, flags, logging
import jax
from ml_collections import config_flags
import numpy as np

from cpt_jax.cl import compare
from cpt_jax.cl import loop
from cpt_jax.cl import report as report_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "demo", "default.py")
DEMO_MD = "DEMO.md"
# Learning gains below this (accuracy as a fraction) count as "learnt nothing".
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
  summaries = {label: load_summary(label, d) for label, d in run_dirs.items()}
  reports = {label: s.report for label, s in summaries.items()}
  timings.update(total=time.perf_counter() - t0, cpu=_cpu_seconds() - cpu0)
  text = demo_markdown(base, summaries, comparison, timings, (load0, os.getloadavg()[0]))
  with open(os.path.join(workdir, DEMO_MD), "w") as f:
    f.write(text)
  return {"comparison": comparison, "reports": reports, "timings": timings, "markdown": text}


def _banner(message: str) -> None:
  print(f"\n=== {message}", flush=True)


def _fmt(value: float | None) -> str:
  return report_lib.format_number(value, percent=False)


# Pairs of runs the reading compares: (A, B, the condition that differs besides the method).
PAIRS = (
    ("sft", "rft", "each at its own learning rate (RFT's 10x smaller, as in the paper)"),
    ("sft", "rft_high_lr", "at the same learning rate (SFT's)"),
    ("sft_low_lr", "rft", "at the same learning rate (RFT's)"),
)
# Compared too, outside the SFT-vs-RFT conclusion.
OTHER_PAIRS = (
    ("sft", "paretocl", "at the same learning rate and epochs (ParetoCL adds replay of the earlier "
     "tasks and a preference-conditioned head)"),
)


def optim_section(config: Mapping[str, Any]) -> Mapping[str, Any]:
  """The section of a run's saved config that holds the optimiser it trained with."""
  method = config["method"]
  if method == "paretocl":
    return config["paretocl"]
  return config["sft" if method in ("sft", "multitask") else "rft"]


@dataclasses.dataclass
class RunSummary:
  """What the reading needs of one continual run."""
  label: str
  report: Mapping[str, Any]
  zero_shot: Mapping[str, float]
  num_examples: int  # test prompts per task

  @property
  def matrix(self) -> np.ndarray:
    return np.asarray(self.report["matrix"], np.float64)

  @property
  def gain(self) -> float:
    """Mean over tasks of (accuracy right after training the task - before any training)."""
    a, tasks = self.matrix, self.report["tasks"]
    return float(np.mean([a[i, i] - self.zero_shot[t] for i, t in enumerate(tasks)]))

  @property
  def fm_standard_error(self) -> float:
    """Binomial standard error of FM from the finite test sets (each accuracy p has variance
    p (1 - p) / n; the max over earlier rows is treated as one accuracy)."""
    a = self.matrix
    last, best = a[-1, :-1], a[:-1, :-1].max(axis=0)
    var = (last * (1 - last) + best * (1 - best)) / self.num_examples
    return float(np.sqrt(var.sum()) / max(1, len(last)))


def load_summary(label: str, run_dir: str) -> RunSummary:
  with open(os.path.join(run_dir, loop.PROGRESS_FILE)) as f:
    zero_shot = json.load(f)["zero_shot"]
  with open(os.path.join(run_dir, "evals", "zero_shot.json")) as f:
    num = min(r["num_examples"] for r in json.load(f).values())
  return RunSummary(label, report_lib.load_report(run_dir), zero_shot, num)


def _compare_pair(a: RunSummary, b: RunSummary, condition: str) -> tuple[str, int]:
  """A sentence on forgetting of `a` vs `b`, and the verdict: 1 a forgot more, -1 b did, 0
  no difference beyond two standard errors of the FM difference."""
  fa, fb = a.report["fm"], b.report["fm"]
  noise = 2 * float(np.hypot(a.fm_standard_error, b.fm_standard_error))
  verdict = 0 if abs(fa - fb) <= noise else (1 if fa < fb else -1)
  said = {1: f"{a.label} forgot more", -1: f"{b.label} forgot more",
          0: "no difference beyond the noise"}[verdict]
  line = (f"{a.label} vs {b.label}, {condition}: FM {_fmt(fa)} vs {_fmt(fb)} (noise +-{noise:.3f})"
          f": {said}. Learning gain on each new task {_fmt(a.gain)} vs {_fmt(b.gain)}.")
  return line, verdict


def reading(summaries: Mapping[str, RunSummary]) -> list[str]:
  """What the numbers say about SFT vs RFT forgetting, in plain sentences."""
  lines, verdicts = [], {}
  for a, b, condition in PAIRS + OTHER_PAIRS:
    if a in summaries and b in summaries:
      line, verdict = _compare_pair(summaries[a], summaries[b], condition)
      lines.append(line)
      if (a, b, condition) in PAIRS:
        verdicts[a, b] = verdict
  for s in summaries.values():
    for name, g in s.report.get("general", {}).items():
      lines.append(f"{s.label}: held-out '{name}' (base skill) {_fmt(g['before'])} -> "
                   f"{_fmt(g['after'])}.")
  paper = verdicts.get(("sft", "rft"))
  same_lr = [v for k, v in verdicts.items() if k != ("sft", "rft")]
  if paper == 1 and same_lr and all(v == 1 for v in same_lr):
    lines.append("Conclusion: SFT forgets more than RFT, also at equal learning rates (the "
                 "paper's finding).")
  elif paper == 1 and same_lr:
    lines.append("Conclusion: RFT forgets less here only through its smaller learning rate; at "
                 "equal learning rates it forgets as much or more. The paper's mechanism (reward "
                 "variance scaling the update) is not what protects this model.")
  elif paper == 1:
    lines.append("Conclusion: SFT forgets more than RFT at the paper's learning-rate ratio (run "
                 "sft_low_lr / rft_high_lr to separate the method from the learning rate).")
  elif paper == 0:
    lines.append("Conclusion: no difference in forgetting between SFT and RFT at the paper's "
                 "learning-rate ratio: the paper's finding is not shown at this scale.")
  elif paper == -1:
    lines.append("Conclusion: RFT forgot more than SFT: the paper's finding is not reproduced "
                 "at this scale.")
  gains = [s.gain for s in summaries.values()]
  if gains and max(gains) < MARGIN:
    lines.append("No run learnt its new tasks beyond the base model (learning gains all below "
                 f"{MARGIN}): what is forgotten is the base model's skill.")
  return lines


def setup_text(summaries: Mapping[str, RunSummary]) -> str:
  """One paragraph on what was run, from the runs' saved configs."""
  configs = [s.report["config"] for s in summaries.values()]
  first = configs[0]
  data = first["data"]
  template = data["answer_template"]
  answer = ("answers directly" if template == "{answer}" else
            f"answers as '{template.replace('{answer}', '...')}'")
  text = (f"Model: the '{first['model']['preset']}' Qwen2.5-VL preset, from a base model trained "
          f"on all seven tasks + 'general' (multitask SFT). Data: "
          f"{data['synthetic']['train_size']} training and {data['synthetic']['test_size']} test "
          f"examples per task ({first['eval']['max_examples'] or 'all'} evaluated, greedy). "
          f"Every run asks with the SFT prompt and the model {answer}.")
  sft = next((c for c in configs if c["method"] in ("sft", "multitask")), None)
  rft = next((c for c in configs if "rft" in c["method"]), None)
  epochs = lambda section: f"{section['epochs']:g} epoch(s) per task" + (
      f" (except {section['epochs_per_task']})" if section["epochs_per_task"] else "")
  if sft is not None:
    text += f" SFT: {epochs(sft['sft'])}, batch {sft['sft']['batch_size']}."
  if rft is not None:
    rl = rft["rft"]["rl"]
    text += (f" RFT: {epochs(rft['rft'])}, {rl['n']} responses per prompt, "
             f"{rl['rollout_batch_size']} prompts per rollout batch, reward '{rl['reward']}', KL "
             f"{rl['kl_coef'] if rl['use_kl'] else 'off'}.")
  pareto = next((c for c in configs if c["method"] == "paretocl"), None)
  if pareto is not None:
    p = pareto["paretocl"]
    text += (f" ParetoCL: SFT's epochs and batch plus {p['replay_batch_size']} replay rows of the "
             f"earlier tasks ({p['replay_examples_per_task'] or 'all'} kept per task), rank-"
             f"{p['rank']} preference-conditioned head, {p['num_preferences']} preferences per "
             f"step, per-prompt min-entropy choice of {p['eval_preferences']} at evaluation.")
  return text


def demo_markdown(base: Mapping[str, Any], summaries: Mapping[str, RunSummary],
                  comparison: Mapping[str, Any], timings: Mapping[str, float],
                  load: tuple[float, float]) -> str:
  header = ["run", "lr", "AvgAcc", "FM", "BWT", "gain", "general before", "general after"]
  body = []
  for label, s in summaries.items():
    r = s.report
    general = r.get("general", {})
    before = ", ".join(_fmt(g["before"]) for g in general.values()) or "n/a"
    after = ", ".join(_fmt(g["after"]) for g in general.values()) or "n/a"
    lr = optim_section(r["config"])["optim"]["lr"]
    body.append([label, f"{lr:g}", _fmt(r["avg_acc"]), _fmt(r["fm"]), _fmt(r["bwt"]),
                 _fmt(s.gain), before, after])
  lines = ["# Demo: continual SFT vs continual RFT (synthetic seven tasks, CPU)", ""]
  lines += [setup_text(summaries), ""]
  lines += report_lib.markdown_table(header, body) + [""]
  lines += ["Base model (multitask SFT) accuracy per task: " + ", ".join(
      f"{t} {_fmt(v)}" for t, v in base["final"].items()) + ".", ""]
  lines += ["gain: mean over tasks of the accuracy right after training a task minus its "
            "accuracy before any continual training (how much was learnt).", ""]
  lines += ["## Reading", ""] + [f"- {line}" for line in reading(summaries)] + [""]
  lines += ["## Per run", ""] + [f"- {label}: [{label}/report.md]({label}/report.md)"
                                  for label in summaries] + [""]
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
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # the terminal shows progress bars and [cpt] lines
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
