"""RIF-RFT filters against hand-counted examples."""
from __future__ import annotations

import numpy as np
import pytest

from cpt_jax.rl import filtering
from cpt_jax.rl.filtering import FilterMode, GroupRefill

# Five instances x four rollouts; pass counts 0, 4, 2, 1, 0.
CORRECT = np.array([
    [0, 0, 0, 0],
    [1, 1, 1, 1],
    [1, 0, 1, 0],
    [0, 0, 1, 0],
    [0, 0, 0, 0],
], bool)


@pytest.mark.parametrize("drop_all_wrong,drop_all_right,keep", [
    (True, False, [0, 1, 1, 1, 0]),  # the authors' code
    (True, True, [0, 0, 1, 1, 0]),  # also drop zero-variance all-correct instances
    (False, True, [1, 0, 1, 1, 1]),
    (False, False, [1, 1, 1, 1, 1]),
])
def test_filter_instances(drop_all_wrong, drop_all_right, keep):
  mask, stats = filtering.filter_instances(CORRECT, drop_all_wrong, drop_all_right)
  assert mask.dtype == bool and mask.tolist() == [bool(k) for k in keep]
  assert stats["num_kept"] == sum(keep) and stats["kept_fraction"] == sum(keep) / 5
  assert (stats["num_instances"], stats["num_all_wrong"], stats["num_all_right"]) == (5, 2, 1)
  assert stats["mean_pass_rate"] == pytest.approx(7 / 20)
  assert stats["pass_count_hist"] == [2, 1, 1, 0, 1]


def test_filter_instances_accepts_0_1_and_rejects_scores():
  mask, _ = filtering.filter_instances(CORRECT.astype(np.float32))
  assert mask.tolist() == [False, True, True, True, False]
  with pytest.raises(ValueError, match="booleans or 0/1"):
    filtering.filter_instances(np.full((2, 3), 0.9))
  with pytest.raises(ValueError, match=r"\[N instances, n rollouts\]"):
    filtering.filter_instances(np.zeros(4, bool))
  _, stats = filtering.filter_instances(np.zeros((0, 8), bool))
  assert stats["num_kept"] == 0 and stats["kept_fraction"] == 0.0


def test_filter_groups_thresholds():
  scores = np.array([
      [0.0, 0.0, 0.0, 0.0],  # mean 0: dropped
      [1.0, 1.0, 1.0, 1.0],  # mean 1: dropped
      [1.0, 0.0, 0.0, 0.0],  # 0.25: kept
      [0.99, 0.99, 0.99, 0.99],  # == high: dropped
      [0.01, 0.01, 0.01, 0.01],  # == low: dropped
      [0.1, 0.1, 0.1, 0.1],  # formatted but all wrong under the mixed reward: kept (see doc)
  ])
  assert filtering.filter_groups(scores).tolist() == [False, False, True, False, False, True]
  assert filtering.filter_groups(scores, low=0.2).tolist() == [False] * 2 + [True] + [False] * 3
  with pytest.raises(ValueError, match="low < high"):
    filtering.filter_groups(scores, low=0.5, high=0.5)
  with pytest.raises(ValueError, match=r"\[B groups, G responses\]"):
    filtering.filter_groups(np.zeros(4))


def test_refill_accumulates_until_target_and_discards_extra():
  refill = GroupRefill(target=5)
  batches = [np.arange(0, 4), np.arange(4, 8), np.arange(8, 12)]
  keeps = [[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]]
  for ids, keep in zip(batches, keeps):
    refill.add({"id": ids, "tokens": np.stack([ids, -ids], axis=1)}, np.array(keep, bool))
  assert refill.ready
  groups, stats = refill.pop()
  assert groups["id"].tolist() == [0, 2, 8, 9, 10]
  assert groups["tokens"][:, 1].tolist() == [0, -2, -8, -9, -10]
  assert stats == {"num_batches": 3, "num_seen": 12, "num_kept": 6, "kept_fraction": 0.5,
                   "num_discarded": 1}
  assert not refill.ready and refill.num_kept == 0  # the extra group 11 is not carried over


def test_refill_errors():
  refill = GroupRefill(target=3, max_batches=2)
  with pytest.raises(ValueError, match="only 0 of 3"):
    refill.pop()
  with pytest.raises(ValueError, match="leading axis"):
    refill.add({"id": np.arange(3)}, np.ones(4, bool))
  refill.add({"id": np.arange(4)}, np.zeros(4, bool))
  with pytest.raises(RuntimeError, match="kept 0 of 8 groups in 2 rollout batches"):
    refill.add({"id": np.arange(4)}, np.zeros(4, bool))
  with pytest.raises(ValueError, match="target"):
    GroupRefill(target=0)


def test_filter_mode_parse():
  assert FilterMode.parse("offline") is FilterMode.OFFLINE
  assert FilterMode.parse(FilterMode.ONLINE) is FilterMode.ONLINE
  assert FilterMode.NONE == "none"
  with pytest.raises(ValueError, match="choose from \\['none', 'offline', 'online'\\]"):
    FilterMode.parse("dapo")
