"""ER / ParetoCL training loop end to end on a tiny synthetic split, metrics and configs."""
from __future__ import annotations

import glob
import importlib.util
import json
import os

import cpt_jax  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import optax

from cpt_jax.paretocl import config_lib, hypernet, train

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs", "paretocl")


def _load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIG_DIR, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _tiny_config(method: str, data_dir: str):
  arg = f"method={method},variant=tiny,buffer=16,data_dir={data_dir}"
  config = _load_config("synthetic.py", arg)
  config.data.num_tasks = 2
  config.data.classes_per_task = 2
  config.model.nf = 4
  config.model.blocks_per_stage = (1, 1, 1, 1)
  config.train.batch_size = config.train.replay_batch_size = 8
  config.paretocl.hidden = 8
  config.paretocl.sweep_points = 5
  config.eval_batch_size = 16
  return config


def test_summary_by_hand():
  acc = np.array([[90.0, 0.0, 0.0],
                  [60.0, 80.0, 0.0],
                  [50.0, 70.0, 85.0]])
  summary = train.summarize(acc)
  assert summary["acc"] == pytest.approx((50 + 70 + 85) / 3)
  assert summary["aaa"] == pytest.approx((90 + 70 + (50 + 70 + 85) / 3) / 3)
  # Task 0: 50 - max(90, 60); task 1: 70 - 80 (negative = forgotten).
  assert summary["forgetting"] == pytest.approx(((50 - 90) + (70 - 80)) / 2)
  assert summary["bwt"] == pytest.approx(((50 - 90) + (70 - 80)) / 2)
  assert summary["final_task_accuracies"] == [50.0, 70.0, 85.0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("method", ["er", "paretocl"])
def test_end_to_end(method, data_dir, tmp_path):
  config = _tiny_config(method, data_dir)
  config.buffer.storage = "host"
  report = train.run(config, str(tmp_path))
  acc = np.array(report["acc_matrix"])
  assert acc.shape == (2, 2) and np.all(np.isfinite(acc)) and np.all((acc >= 0) & (acc <= 100))
  assert report["steps"] == 2 * 3  # 24 images per task in batches of 8
  for key in ("acc", "aaa", "forgetting", "bwt"):
    assert np.isfinite(report[key])
  assert report["acc"] == pytest.approx(acc[-1].mean())
  lines = open(tmp_path / "tasks.jsonl").read().splitlines()
  assert [json.loads(line)["task"] for line in lines] == [0, 1]
  assert json.load(open(tmp_path / "report.json")) == json.loads(json.dumps(report))
  # The continual post-training report format, so cl.compare reads these runs too.
  assert report["matrix"] == acc.tolist() and report["avg_acc"] == pytest.approx(report["acc"])
  for name in ("report.md", "accuracy_matrix.csv", "accuracy_matrix.png"):
    assert (tmp_path / name).is_file(), name
  if method == "paretocl":
    assert np.array(report["paretocl_minus"]["acc_matrix"]).shape == (2, 2)
    assert report["sweep"]["alpha_new"] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    assert np.array(report["sweep"]["old_new_after_task"]).shape == (1, 5, 2)


def test_train_step_fits_a_repeated_batch(data_dir):
  # Gradients reach the backbone and the hypernetwork: repeated steps on one batch lower the loss.
  config = _tiny_config("paretocl", data_dir)
  model = train.ContinualClassifier(config, 4, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  step = train.make_train_step(graphdef, config, mean, std)
  rng = np.random.default_rng(0)

  def batch():  # the label sets the brightness, so the batch can be fitted
    labels = rng.integers(0, 4, 8).astype(np.int32)
    images = 60 * labels[:, None, None, None] + rng.integers(0, 40, (8, 16, 16, 3))
    return {"images": images.astype(np.uint8), "labels": labels,
            "task_ids": np.zeros(8, np.int32), "valid": np.ones(8, bool)}

  stream, replay = batch(), batch()
  losses = []
  for _ in range(10):
    state, metrics = step(state, stream, replay, jax.random.key(1, impl="rbg"))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("method", ["er", "paretocl"])
def test_predictions_range_over_seen_classes(method, data_dir):
  # Class-IL evaluation: a class not trained yet is never predicted, even when its logit is
  # the largest, and ParetoCL's entropy is taken over the seen classes only.
  config = _tiny_config(method, data_dir)
  model = train.ContinualClassifier(config, 4, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  bias = model.head.bias if method == "er" else model.head.hypernet.outputs["bias"].bias
  bias[...] = bias[...].at[3].set(100.0)  # class 3 dominates every (generated) head
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  eval_step = train.make_eval_step(graphdef, config, mean, std)
  images = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3)).astype(np.uint8)
  rng = jax.random.key(0, impl="rbg")
  for name, pred in eval_step(state, images, np.int32(4), rng).items():
    np.testing.assert_array_equal(pred, 3, err_msg=name)
  for name, pred in eval_step(state, images, np.int32(2), rng).items():
    assert np.all(np.asarray(pred) < 2), (name, pred)
  logits = train.mask_unseen_classes(jnp.array([[[0.0, 0.0, 9.0]], [[2.0, 0.0, 0.0]]]),
                                     jnp.array([True, True, False]))  # [K=2, B=1, C=3]
  pred, chosen = hypernet.min_entropy_select(logits)
  assert int(chosen[0]) == 1 and int(pred[0]) == 0  # unmasked, head 0 would win on entropy
  assert np.all(np.isfinite(hypernet.softmax_entropy(logits)))


def test_configs_load_and_validate():
  paths = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))
  assert {os.path.basename(p) for p in paths} >= {
      "synthetic.py", "seq_cifar10.py", "seq_cifar100.py", "seq_tinyimagenet.py"}
  for path in paths:
    config = _load_config(os.path.basename(path), "method=er,setting=offline")
    assert config.job == "paretocl_classic" and config.train.epochs == 5
    train.validate_config(config)
  cifar100 = _load_config("seq_cifar100.py")
  assert (cifar100.data.num_tasks, cifar100.data.classes_per_task) == (10, 10)
  assert cifar100.train.epochs == 1 and not cifar100.train.augment
  assert _load_config("seq_tinyimagenet.py").data.classes_per_task == 20
  with pytest.raises(ValueError, match="key=value"):
    _load_config("synthetic.py", "methd=er")
  bad = _load_config("synthetic.py")
  bad.method = "der"
  with pytest.raises(ValueError, match="method must be one of"):
    train.validate_config(bad)
  assert config_lib.parse_bool("", default=True) and not config_lib.parse_bool("0", default=True)
