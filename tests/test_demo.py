"""A miniature demo (tiny sizes) end to end: base model, continual SFT and RFT from it, the
comparison table and DEMO.md."""
from __future__ import annotations

import json
import os
import sys

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
  config = default.get_config("mini")
  config.compilation_cache = False  # the test process shares jax's global config
  result = demo.run_demo(config, str(tmp_path))
  for name in (demo.DEMO_MD, compare.COMPARISON_MD, compare.COMPARISON_PNG,
               "base/report.json", "sft/accuracy_matrix.png", "rft/reward_var_vs_grad_norm.png"):
    assert (tmp_path / name).is_file(), name
  reports = result["reports"]
  assert list(reports) == ["sft", "rft"]
  for label, rep in reports.items():
    assert rep["num_trained"] == 7 and len(rep["matrix"]) == 7
    assert set(rep["general"]) == {"general"}
    # Both continual runs start from the base model: their zero-shot rows are its accuracies.
    progress = json.loads((tmp_path / label / "progress.json").read_text())
    base = json.loads((tmp_path / "base/progress.json").read_text())
    assert progress["zero_shot"] == base["rows"][0]
  text = (tmp_path / demo.DEMO_MD).read_text()
  assert "| run | AvgAcc | FM | BWT | general before | general after |" in text
  for label in ("sft", "rft"):
    row = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    assert report_lib.format_number(reports[label]["avg_acc"], False) in row
  assert "## Reading" in text and ("forgot" in text or "No clear difference" in text)
  assert "[cpt] stage 6" in capsys.readouterr().out  # progress on the terminal
