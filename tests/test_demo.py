"""A miniature demo (tiny sizes) end to end: base model, continual SFT and RFT from it, the
comparison table and DEMO.md with its reading."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from cpt_jax import demo
from cpt_jax.cl import compare
from cpt_jax.cl import report as report_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # config files import `configs.common`, found from the repo root
try:
  from configs.demo import default  # noqa: E402
finally:
  sys.path.remove(ROOT)


def test_mini_demo_end_to_end(tmp_path, capsys):
  config = default.get_config("mini,runs=sft+rft")
  config.compilation_cache = False  # the test process shares jax's global config
  result = demo.run_demo(config, str(tmp_path))
  for name in (demo.DEMO_MD, compare.COMPARISON_MD, compare.COMPARISON_PNG,
               "base/report.json", "sft/accuracy_matrix.png", "rft/reward_var_vs_grad_norm.png"):
    assert (tmp_path / name).is_file(), name
  reports = result["reports"]
  assert list(reports) == ["sft", "rft"]
  base = json.loads((tmp_path / "base/progress.json").read_text())
  for label, rep in reports.items():
    assert rep["num_trained"] == 7 and len(rep["matrix"]) == 7
    assert set(rep["general"]) == {"general"}
    # Both continual runs start from the base model: their zero-shot row is its final row.
    progress = json.loads((tmp_path / label / "progress.json").read_text())
    assert progress["zero_shot"] == base["rows"][0]
  text = (tmp_path / demo.DEMO_MD).read_text()
  assert "| run | lr | AvgAcc | FM | BWT | gain | general before | general after |" in text
  for label in ("sft", "rft"):
    row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    assert report_lib.format_number(reports[label]["avg_acc"], False) in row
  assert "sft vs rft, each at its own learning rate" in text and "Conclusion:" in text
  assert "[cpt] stage 6" in capsys.readouterr().out  # progress on the terminal


def summary(matrix, zero_shot, fm=None, n=100):
  matrix = np.asarray(matrix, np.float64)
  tasks = [f"t{i}" for i in range(len(matrix))]
  fm = fm if fm is not None else float(np.mean(matrix[-1, :-1] - matrix[:-1, :-1].max(0)))
  return demo.RunSummary("x", {"matrix": matrix.tolist(), "tasks": tasks, "fm": fm},
                         dict(zip(tasks, zero_shot)), n)


def test_gain_and_fm_noise_by_hand():
  s = summary([[0.5, 0.2], [0.3, 0.6]], zero_shot=[0.4, 0.1], n=100)
  assert s.gain == pytest.approx(((0.5 - 0.4) + (0.6 - 0.1)) / 2)
  # FM = 0.3 - 0.5; its variance: (0.3 * 0.7 + 0.5 * 0.5) / 100, over one task.
  assert s.fm_standard_error == pytest.approx(np.sqrt((0.21 + 0.25) / 100))


def test_reading_separates_method_from_learning_rate():
  forgets = [[0.8, 0.1], [0.2, 0.9]]   # FM -0.6
  keeps = [[0.8, 0.1], [0.8, 0.9]]     # FM 0
  zero = [0.5, 0.1]
  runs = {"sft": summary(forgets, zero), "rft": summary(keeps, zero),
          "rft_high_lr": summary(forgets, zero)}
  for k, s in runs.items():
    s.label = k
  lines = demo.reading(runs)
  assert "sft forgot more" in lines[0] and "no difference beyond the noise" in lines[1]
  assert lines[-1].startswith("Conclusion: RFT forgets less here only through its smaller")
  runs["rft_high_lr"] = summary(keeps, zero)
  runs["rft_high_lr"].label = "rft_high_lr"
  assert demo.reading(runs)[-1].startswith("Conclusion: SFT forgets more than RFT, also at")
  runs = {"sft": runs["rft"], "rft": runs["rft_high_lr"]}
  assert "not shown at this scale" in demo.reading(runs)[-1]


def test_paretocl_run_in_the_menu_table_and_reading():
  """An optional paretocl run: not in the default runs; its lr column reads its own optimiser;
  its comparison with sft is read out but leaves the SFT-vs-RFT conclusion alone."""
  assert "paretocl" not in default.get_config().order
  config = default.get_config("mini,runs=sft+rft+paretocl")
  run = config.runs.paretocl
  assert run.method == "paretocl" and run.init.workdir == ""
  run.paretocl.optim.lr = 1.25e-3  # differs from sft.optim.lr: the column must read this one
  saved = json.loads(run.to_json())
  assert demo.optim_section(saved)["optim"]["lr"] == 1.25e-3
  assert demo.optim_section(json.loads(config.runs.rft.to_json()))["optim"]["lr"] == default.RFT_LR

  forgets = [[0.8, 0.1], [0.2, 0.9]]   # FM -0.6
  keeps = [[0.8, 0.1], [0.8, 0.9]]     # FM 0
  zero = [0.5, 0.1]
  runs = {"sft": summary(forgets, zero), "rft": summary(keeps, zero),
          "paretocl": summary(keeps, zero)}
  for k, s in runs.items():
    s.label = k
  lines = demo.reading(runs)
  assert any(line.startswith("sft vs paretocl, at the same learning rate and epochs") and
             "sft forgot more" in line for line in lines)
  # As without the paretocl run: SFT forgets more at the paper's ratio, no same-lr controls.
  assert lines[-1].startswith("Conclusion: SFT forgets more than RFT at the paper's")
  runs["paretocl"].report["config"] = saved
  runs["sft"].report["config"] = json.loads(config.runs.sft.to_json())
  assert "ParetoCL: SFT's epochs and batch plus 2 replay rows" in demo.setup_text(
      {k: runs[k] for k in ("sft", "paretocl")})
