"""Report and comparison files of continual runs, checked against hand-computed metrics."""
from __future__ import annotations

import csv
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cpt_jax.cl import compare, report

NAMES = ["sqa", "tvqa", "geo"]
NAN = float("nan")

# GRPO-like run, percent. Row j = after training task j; task 0 peaks after task 1 (85 > 80),
# so FM and BWT differ.
#   AvgAcc = (50 + 65 + 90) / 3                              = 68.333
#   FM     = mean(50 - max(80, 85), 65 - max(20, 70))       = mean(-35, -5)  = -20
#   BWT    = mean(50 - 80, 65 - 70)                         = mean(-30, -5)  = -17.5
#   AAA    = mean(80, (85 + 70) / 2, 205 / 3)               = (80 + 77.5 + 68.333) / 3 = 75.278
RFT = [[80, 20, 10],
       [85, 70, 30],
       [50, 65, 90]]
# SFT-like run.
#   AvgAcc = (30 + 35 + 85) / 3 = 50
#   FM     = mean(30 - 90, 35 - 80) = -52.5 ; BWT = mean(30 - 90, 35 - 80) = -52.5
#   AAA    = mean(90, (40 + 80) / 2, 50) = (90 + 60 + 50) / 3 = 66.667
SFT = [[90, 5, 10],
       [40, 80, 20],
       [30, 35, 85]]
BEFORE = {"mmmu": 52.1, "mmlu_pro": 47.5}
RFT_AFTER = {"mmmu": 54.2, "mmlu_pro": 47.0}  # deltas +2.1, -0.5; mean +0.8
SFT_AFTER = {"mmmu": 40.1, "mmlu_pro": 30.6}  # deltas -12.0, -16.9; mean -14.45

# grad_norm = 2 * var + 0.5 exactly on the RFT steps: fit slope 2, intercept 0.5, r = 1. The
# step without a variance (an SFT-style entry) and the skipped (NaN) step are left out.
STEPS = ([{"step": k, "reward_var": v, "grad_norm": 2 * v + 0.5}
          for k, v in enumerate([0.0, 0.05, 0.1, 0.2, 0.25])]
         + [{"step": 5, "grad_norm": 9.0}, {"step": 6, "reward_var_within": NAN, "grad_norm": 1.0}])


def _check_png(path):
  assert os.path.getsize(path) > 0
  with Image.open(path) as image:
    assert image.format == "PNG"
    assert image.width > 200 and image.height > 200
    image.verify()


def _read_csv(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  config = ml_collections.ConfigDict({"optim": {"lr": 1e-6}, "tasks": NAMES})
  rft = report.write_report(root / "rft", method="GRPO", task_names=NAMES, matrix=RFT,
                            general_before=BEFORE, general_after=RFT_AFTER, step_metrics=STEPS,
                            config=config)
  sft = report.write_report(root / "sft", method="SFT", task_names=NAMES, matrix=SFT,
                            general_before=BEFORE, general_after=SFT_AFTER)
  return root, rft, sft


def test_report_json(runs):
  root, rft, _ = runs
  loaded = report.load_report(root / "rft")
  assert loaded == rft
  assert loaded["method"] == "GRPO"
  assert loaded["num_trained"] == loaded["num_tasks"] == 3
  assert loaded["avg_acc"] == pytest.approx(205 / 3)
  assert loaded["fm"] == pytest.approx(-20.0)
  assert loaded["bwt"] == pytest.approx(-17.5)
  assert loaded["aaa"] == pytest.approx((80 + 77.5 + 205 / 3) / 3)
  assert loaded["matrix"] == RFT
  assert loaded["forgetting"] == pytest.approx({"sqa": -35.0, "tvqa": -5.0})
  assert loaded["general"]["mmmu"]["delta"] == pytest.approx(2.1)
  assert loaded["general_mean_delta"] == pytest.approx(0.8)
  assert loaded["config"] == {"optim": {"lr": 1e-6}, "tasks": NAMES}
  fit = loaded["variance_fit"]
  assert fit["num_steps"] == 5
  assert fit["slope"] == pytest.approx(2.0)
  assert fit["intercept"] == pytest.approx(0.5)
  assert fit["pearson_r"] == pytest.approx(1.0)
  assert fit["mean_reward_var"] == pytest.approx(0.12)


def test_report_csv_markdown_and_plots(runs):
  root, _, sft = runs
  rows = _read_csv(root / "rft" / report.MATRIX_CSV)
  assert rows[0] == ["after_task", *NAMES]
  assert [r[0] for r in rows[1:]] == NAMES
  np.testing.assert_array_equal(np.array([r[1:] for r in rows[1:]], float), RFT)

  md = (root / "rft" / report.REPORT_MD).read_text()
  for line in ["| AvgAcc | 68.33 |", "| FM | -20.00 |", "| BWT | -17.50 |", "| AAA | 75.28 |",
               "| General mean delta | 0.80 |", "| mmmu | 52.10 | 54.20 | 2.10 |",
               "| tvqa | 85.00 | 70.00 | 30.00 |", "| sqa | -35.00 |",
               "| 5 | 0.1200 | 0.7400 | 2.0000 | 0.5000 | 1.0000 |"]:
    assert line in md, line
  assert "Trained 3 of 3 tasks (complete)" in md

  for name in (report.HEATMAP_PNG, report.CURVES_PNG, report.VARIANCE_PNG):
    _check_png(root / "rft" / name)
  # SFT run: no reward variance, so no scatter plot and no fit.
  assert sft["variance_fit"] is None
  assert not (root / "sft" / report.VARIANCE_PNG).exists()
  assert sft["avg_acc"] == pytest.approx(50.0) and sft["fm"] == pytest.approx(-52.5)


def test_partial_matrix(tmp_path):
  # Fractions, task 2 not trained yet: scored on [[0.80, 0.20], [0.85, 0.70]].
  #   AvgAcc = 0.775 ; FM = BWT = 0.85 - 0.80 = 0.05 ; AAA = (0.80 + 0.775) / 2 = 0.7875
  matrix = np.array(RFT, float) / 100
  matrix[2] = NAN
  rep = report.write_report(tmp_path, method="GRPO", task_names=NAMES, matrix=matrix,
                            step_metrics=[])
  assert rep["num_trained"] == 2 and rep["num_tasks"] == 3
  assert rep["avg_acc"] == pytest.approx(0.775)
  assert rep["fm"] == pytest.approx(0.05) and rep["bwt"] == pytest.approx(0.05)
  assert rep["aaa"] == pytest.approx(0.7875)
  assert len(_read_csv(tmp_path / report.MATRIX_CSV)) == 1 + 2
  md = (tmp_path / report.REPORT_MD).read_text()
  assert "Trained 2 of 3 tasks (in progress)" in md
  assert "| AvgAcc | 0.7750 |" in md and "| FM | 0.0500 |" in md
  _check_png(tmp_path / report.HEATMAP_PNG)
  _check_png(tmp_path / report.CURVES_PNG)

  # After the first task only: FM and BWT are undefined -> null in JSON, n/a in Markdown.
  matrix[1] = NAN
  rep = report.write_report(tmp_path, method="GRPO", task_names=NAMES, matrix=matrix)
  loaded = report.load_report(tmp_path)
  assert loaded["fm"] is None and loaded["bwt"] is None
  assert rep["avg_acc"] == pytest.approx(0.80)
  assert "| FM | n/a |" in (tmp_path / report.REPORT_MD).read_text()


@pytest.mark.parametrize("matrix,step_metrics,match", [
    ([[80, 20, 10], [NAN] * 3, [50, 65, 90]], None, "evaluated rows must come first"),
    ([[80, 20, 10], [85, NAN, 30], [NAN] * 3], None, r"\(row, task\) \[\(1, 1\)\]"),
    ([[NAN] * 3] * 3, None, "no evaluated row"),
    ([[80, 20], [85, 70]], None, r"for 3 tasks, got shape \(2, 2\)"),
    (RFT, [{"reward_var": 0.1}], "step_metrics\\[0\\] has 'reward_var' but no 'grad_norm'"),
])
def test_bad_input(tmp_path, matrix, step_metrics, match):
  with pytest.raises(ValueError, match=match):
    report.write_report(tmp_path, method="SFT", task_names=NAMES, matrix=matrix,
                        step_metrics=step_metrics)
  assert not (tmp_path / report.REPORT_JSON).exists()


def test_compare_two_runs(runs, tmp_path, capsys):
  root, _, _ = runs
  out = tmp_path / "cmp"
  compare.main([str(root / "sft"), str(root / "rft"), "--out", str(out)])
  assert "| SFT | 3/3 |" in capsys.readouterr().out

  rows = list(csv.DictReader(open(out / compare.COMPARISON_CSV, newline="")))
  assert [r["run"] for r in rows] == ["SFT", "GRPO"]
  expected = {"SFT": (50.0, -52.5, -52.5, 200 / 3, -12.0, -16.9, -14.45),
              "GRPO": (205 / 3, -20.0, -17.5, (80 + 77.5 + 205 / 3) / 3, 2.1, -0.5, 0.8)}
  for r in rows:
    got = [float(r[k]) for k in ("avg_acc", "fm", "bwt", "aaa", "delta_mmmu",
                                 "delta_mmlu_pro", "general_mean_delta")]
    assert got == pytest.approx(expected[r["run"]])
  assert [float(rows[0][f"final_{t}"]) for t in NAMES] == SFT[-1]

  comparison = json.load(open(out / compare.COMPARISON_JSON))
  assert comparison["tasks"] == NAMES
  assert comparison["runs"][1]["final"] == dict(zip(NAMES, map(float, RFT[-1])))
  md = (out / compare.COMPARISON_MD).read_text()
  assert "| SFT | 3/3 | 50.00 | -52.50 | -52.50 | 66.67 |" in md
  assert "| GRPO | 3/3 | 68.33 | -20.00 | -17.50 | 75.28 |" in md
  assert "| GRPO | 50.00 | 65.00 | 90.00 |" in md
  _check_png(out / compare.COMPARISON_PNG)


def test_compare_same_method_labels_by_directory(runs, tmp_path):
  root, _, _ = runs
  for seed in ("seed0", "seed1"):
    shutil.copytree(root / "sft", tmp_path / seed)
  comparison = compare.compare_runs([tmp_path / "seed0", tmp_path / "seed1"], tmp_path / "cmp")
  assert [r["run"] for r in comparison["runs"]] == ["SFT (seed0)", "SFT (seed1)"]


def test_missing_report(runs, tmp_path, capsys):
  root, _, _ = runs
  missing = tmp_path / "not_a_run"
  missing.mkdir()
  with pytest.raises(FileNotFoundError, match="not_a_run.*has no report.json"):
    report.load_report(missing)
  with pytest.raises(SystemExit) as exit_info:
    compare.main([str(root / "sft"), str(missing), "--out", str(tmp_path / "cmp")])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert str(missing) in err and "report.json" in err and str(root / "sft") not in err
  assert not (tmp_path / "cmp").exists()


def test_compare_rejects_mixed_units(runs, tmp_path):
  root, _, _ = runs
  shutil.copytree(root / "sft", tmp_path / "fraction")
  path = tmp_path / "fraction" / report.REPORT_JSON
  rep = json.loads(path.read_text())
  rep["method"], rep["matrix"] = "SFT-fraction", (np.array(SFT) / 100).tolist()
  path.write_text(json.dumps(rep))
  with pytest.raises(ValueError, match=r"percent for \['GRPO'\], fractions for \['SFT-fraction'\]"):
    compare.compare_runs([root / "rft", tmp_path / "fraction"], tmp_path / "cmp")
