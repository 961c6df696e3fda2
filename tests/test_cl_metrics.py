"""Continual-learning metrics against matrices worked out by hand (0-indexed rows/tasks)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cpt_jax.cl import metrics

# 3 tasks. Row j = after training task j.
#   AvgAcc = (65 + 50 + 90) / 3                        = 68.333...
#   FM     = mean(65 - max(80, 70), 50 - max(10, 60))   = mean(-15, -10) = -12.5
#   BWT    = mean(65 - 80, 50 - 60)                     = -12.5
#   AAA    = mean(80, (70 + 60) / 2, 205 / 3)           = (80 + 65 + 68.333) / 3 = 71.111...
A3 = [[80, 10, 20],
      [70, 60, 25],
      [65, 50, 90]]

# 4 tasks where FM and BWT differ: task 0 peaks after task 2 (55 > its own 50).
#   AvgAcc = (52 + 65 + 60 + 90) / 4                                  = 66.75
#   FM     = mean(52 - max(50, 45, 55), 65 - max(40, 70, 60), 60 - max(30, 35, 80))
#          = mean(-3, -5, -20)                                        = -28 / 3
#   BWT    = mean(52 - 50, 65 - 70, 60 - 80) = mean(2, -5, -20)       = -23 / 3
#   AAA    = mean(50, (45 + 70) / 2, (55 + 60 + 80) / 3, 66.75)
#          = (50 + 57.5 + 65 + 66.75) / 4                             = 59.8125
A4 = [[50, 40, 30, 20],
      [45, 70, 35, 25],
      [55, 60, 80, 30],
      [52, 65, 60, 90]]


@pytest.mark.parametrize("matrix,avg,fm,bwt,aaa", [
    (A3, 205 / 3, -12.5, -12.5, (80 + 65 + 205 / 3) / 3),
    (A4, 66.75, -28 / 3, -23 / 3, 59.8125),
    # Still training: 2 of 4 tasks done, scored on the seen 2 x 2 block [[50, 40], [45, 70]].
    (A4[:2], 57.5, -5.0, -5.0, 53.75),
])
def test_metrics_by_hand(matrix, avg, fm, bwt, aaa):
  assert metrics.avg_acc(matrix) == pytest.approx(avg)
  assert metrics.forgetting(matrix) == pytest.approx(fm)
  assert metrics.backward_transfer(matrix) == pytest.approx(bwt)
  assert metrics.average_anytime_accuracy(matrix) == pytest.approx(aaa)


def test_fm_max_runs_over_all_rows_before_the_last_including_before_training():
  # Task 2 scored 85 zero-shot (row 0), above its 80 right after training: FM uses 85;
  # the final row (60) is excluded from the max even if it were the highest.
  a = np.array(A4, float)
  a[0, 2] = 85
  assert metrics.forgetting_per_task(a).tolist() == pytest.approx([-3, -5, -25])
  a[3, 0] = 99
  assert metrics.forgetting_per_task(a)[0] == pytest.approx(99 - 55)


def test_single_task():
  assert metrics.avg_acc([[0.7, 0.1]]) == pytest.approx(0.7)
  assert metrics.average_anytime_accuracy([[0.7, 0.1]]) == pytest.approx(0.7)
  assert math.isnan(metrics.forgetting([[0.7, 0.1]]))
  assert math.isnan(metrics.backward_transfer([[0.7, 0.1]]))


def test_summarize_with_general_benchmarks():
  names = ["scienceqa", "textvqa", "vizwiz", "gqa"]
  summary = metrics.summarize(A4, names, general_before={"mmmu": 52.1, "mmlu_pro": 47.5},
                              general_after={"mmmu": 40.1, "mmlu_pro": 30.6})
  assert summary["avg_acc"] == pytest.approx(66.75)
  assert summary["fm"] == pytest.approx(-28 / 3) and summary["bwt"] == pytest.approx(-23 / 3)
  assert summary["aaa"] == pytest.approx(59.8125)
  assert summary["final"] == {"scienceqa": 52, "textvqa": 65, "vizwiz": 60, "gqa": 90}
  assert summary["forgetting"] == pytest.approx({"scienceqa": -3, "textvqa": -5, "vizwiz": -20})
  assert summary["general"]["mmmu"] == pytest.approx(
      {"before": 52.1, "after": 40.1, "delta": -12.0})
  assert summary["general"]["mmlu_pro"]["delta"] == pytest.approx(-16.9)
  assert summary["general_mean_delta"] == pytest.approx(-14.45)
  assert summary["num_trained"] == 4 and summary["matrix"] == A4
  json.dumps(summary)
  assert "general" not in metrics.summarize(A3)
  assert metrics.summarize(A3)["tasks"] == ["task0", "task1", "task2"]


def test_accuracy_matrix_from_per_stage_evaluations():
  evals = [{"b": 10, "a": 80}, {"a": 70, "b": 60, "extra": 1}]
  np.testing.assert_array_equal(metrics.accuracy_matrix(evals, ["a", "b"]), [[80, 10], [70, 60]])
  with pytest.raises(ValueError, match=r"after task 1 lacks tasks \['b'\]"):
    metrics.accuracy_matrix([{"a": 1, "b": 2}, {"a": 1}], ["a", "b"])


def test_bad_inputs_raise_clear_errors():
  with pytest.raises(ValueError, match=r"1 <= J <= T, got shape \(3, 2\)"):
    metrics.avg_acc([[1, 2], [3, 4], [5, 6]])
  with pytest.raises(ValueError, match=r"non-finite entries at \(row, task\) \[\(1, 0\)\]"):
    metrics.forgetting([[1, 2], [np.nan, 4]])
  with pytest.raises(ValueError, match="3 task names for a matrix with 2 tasks"):
    metrics.summarize([[1, 2]], ["a", "b", "c"])
  with pytest.raises(ValueError, match="both general_before and general_after"):
    metrics.summarize([[1, 2]], general_before={"mmmu": 1.0})
  with pytest.raises(ValueError, match="general benchmarks differ"):
    metrics.general_deltas({"mmmu": 1.0}, {"pope": 1.0})
