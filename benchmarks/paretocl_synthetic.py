"""ParetoCL vs ER on the synthetic class-incremental split (5 tasks x 2 classes), 3 seeds.

  .venv/bin/python benchmarks/paretocl_synthetic.py --workdir=/tmp/paretocl_bench [--buffer=500]
      [--setting=online] [--seeds=0,1,2] [--out=benchmarks/paretocl_synthetic.json]

Methods can run in parallel invocations (--methods=er / --methods=paretocl, same workdir);
a final `--reuse` invocation merges their reports into one summary.

Writes mean +- std of Acc / AAA / forgetting per method (ER, ParetoCL, and ParetoCL-- which
evaluates the same ParetoCL model at the fixed preference (0.5, 0.5)), and the alpha sweep
after the last task (old-task, new-task and all-task accuracy per alpha_new, over seeds).
"""
from __future__ import annotations

import importlib.util
import json
import os
import time

import jax
import numpy as np
from absl import app, flags, logging

import cpt_jax  # noqa: F401
from cpt_jax.paretocl import train

flags.DEFINE_string("workdir", "/tmp/paretocl_bench", "Run folders and the dataset go here.")
flags.DEFINE_string("out", "", "Summary JSON path (default: <workdir>/summary.json).")
flags.DEFINE_integer("buffer", 500, "Replay buffer size (same for both methods).")
flags.DEFINE_string("setting", "online", "online (1 epoch per task) or offline (5).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds.")
flags.DEFINE_list("methods", ["er", "paretocl"], "Methods.")
flags.DEFINE_float("grad_clip", None, "Global-norm gradient clip for both methods (default: the "
                   "config's, 1.0 as in the paper; inf: no clipping).")
flags.DEFINE_bool("reuse", False, "Read <workdir>/<method>_seed<seed>/report.json where it exists "
                  "instead of training again (to merge runs made by parallel invocations).")
FLAGS = flags.FLAGS

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "paretocl", "synthetic.py")


def _config(method: str, seed: int):
  spec = importlib.util.spec_from_file_location("synthetic_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  data_dir = os.path.join(FLAGS.workdir, "tfds")
  config = module.get_config(f"method={method},setting={FLAGS.setting},seed={seed},"
                             f"buffer={FLAGS.buffer},data_dir={data_dir}")
  if FLAGS.grad_clip is not None:
    config.train.grad_clip = FLAGS.grad_clip
  return config


def _grad_clip_json(grad_clip: float) -> float | None:
  """The clip as JSON allows it: null for no clipping (inf)."""
  return float(grad_clip) if np.isfinite(grad_clip) else None


def _mean_std(values) -> dict:
  return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": list(values)}


def main(argv):
  del argv
  # Runs differ only in data and seeds, so the compiled steps are reused from disk.
  jax.config.update("jax_compilation_cache_dir", os.path.join(FLAGS.workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  reports = {}
  for method in FLAGS.methods:
    for seed in map(int, FLAGS.seeds):
      run_dir = os.path.join(FLAGS.workdir, f"{method}_seed{seed}")
      report_path = os.path.join(run_dir, "report.json")
      if FLAGS.reuse and os.path.exists(report_path):
        with open(report_path) as f:
          report = json.load(f)
        # Reports written before wall_seconds was recorded: training time only (no evaluation).
        report.setdefault("wall_seconds", report["train_seconds_incl_compile"])
        reports.setdefault(method, []).append(report)
        continue
      start = time.time()
      report = train.run(_config(method, seed), run_dir)
      report["wall_seconds"] = time.time() - start
      with open(report_path, "w") as f:
        json.dump(report, f, indent=1)
      reports.setdefault(method, []).append(report)
      logging.info("%s seed %d: Acc %.2f AAA %.2f (%.0f s)", method, seed, report["acc"],
                   report["aaa"], report["wall_seconds"])

  summary = {"setting": FLAGS.setting, "buffer": FLAGS.buffer, "seeds": FLAGS.seeds,
             "grad_clip": _grad_clip_json(_config(FLAGS.methods[0], 0).train.grad_clip),
             "device": str(jax.devices()[0]), "methods": {}}
  rows = [(m, m, lambda r: r) for m in reports]
  if "paretocl" in reports:
    rows.append(("paretocl_minus", "paretocl", lambda r: r["paretocl_minus"]))
  for name, method, pick in rows:
    picked = [pick(r) for r in reports[method]]
    summary["methods"][name] = {key: _mean_std([p[key] for p in picked])
                                for key in ("acc", "aaa", "forgetting")}
    walls = [r["wall_seconds"] for r in reports[method]]
    summary["methods"][name]["wall_seconds"] = _mean_std(walls)
  if "paretocl" in reports:
    # [seeds, S, 2] after the last task: (old-task mean accuracy, new-task accuracy).
    sweep = np.array([r["sweep"]["old_new_after_task"][-1] for r in reports["paretocl"]])
    num_tasks = reports["paretocl"][0]["num_tasks"]
    # Acc (mean over all tasks) of the head at each fixed preference: an oracle choice, since
    # picking the best alpha uses the test set.
    sweep_acc = ((num_tasks - 1) * sweep[:, :, 0] + sweep[:, :, 1]) / num_tasks  # [seeds, S]
    summary["sweep_after_last_task"] = {
        "acc_mean": sweep_acc.mean(0).tolist(), "acc_std": sweep_acc.std(0).tolist(),
        "alpha_new": reports["paretocl"][0]["sweep"]["alpha_new"],
        "old_acc_mean": sweep[:, :, 0].mean(0).tolist(),
        "new_acc_mean": sweep[:, :, 1].mean(0).tolist(),
        "old_acc_std": sweep[:, :, 0].std(0).tolist(),
        "new_acc_std": sweep[:, :, 1].std(0).tolist()}
  out = FLAGS.out or os.path.join(FLAGS.workdir, "summary.json")
  with open(out, "w") as f:
    json.dump(summary, f, indent=1)
  for name, stats in summary["methods"].items():
    print(f"{name:15s} Acc {stats['acc']['mean']:6.2f} +- {stats['acc']['std']:5.2f}   "
          f"AAA {stats['aaa']['mean']:6.2f} +- {stats['aaa']['std']:5.2f}   "
          f"forgetting {stats['forgetting']['mean']:7.2f} +- {stats['forgetting']['std']:5.2f}")
  if "sweep_after_last_task" in summary:
    s = summary["sweep_after_last_task"]
    for i, alpha_new in enumerate(s["alpha_new"]):
      print(f"alpha_new {alpha_new:4.2f}: old {s['old_acc_mean'][i]:6.2f}  "
            f"new {s['new_acc_mean'][i]:6.2f}  Acc {s['acc_mean'][i]:6.2f}")
  print(f"summary: {out}")


if __name__ == "__main__":
  app.run(main)
