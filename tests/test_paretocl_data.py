"""Class-incremental splits, read through TFDS from datasets written on disk by the tests."""
from __future__ import annotations

import cpt_jax  # noqa: F401
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.image_classification import cifar

from cpt_jax.paretocl import data, synthetic


def _data_config(name, data_dir, num_tasks, classes_per_task, seed=None, test_split="test"):
  return ml_collections.ConfigDict(dict(
      name=name, data_dir=str(data_dir), train_split="train", test_split=test_split,
      num_tasks=num_tasks, classes_per_task=classes_per_task, class_order_seed=seed))


def test_split_by_class_seeded_order():
  labels = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5])
  images = (labels * 10).astype(np.uint8).reshape(-1, 1, 1, 1)
  order = data.make_class_order(6, seed=3)
  assert sorted(order) == list(range(6)) and not np.array_equal(order, np.arange(6))
  np.testing.assert_array_equal(order, data.make_class_order(6, seed=3))
  tasks = data.split_by_class(images, labels, order, num_tasks=2, classes_per_task=2)
  for t, task in enumerate(tasks):
    originals = set(order[2 * t:2 * t + 2])
    assert set(task.images[:, 0, 0, 0] // 10) == originals  # exactly those classes' examples
    assert len(task.labels) == 4
    # Relabelled by position in the order: original label order[l] -> l.
    np.testing.assert_array_equal(order[task.labels], task.images[:, 0, 0, 0] // 10)
    assert set(task.labels) == {2 * t, 2 * t + 1}
  with pytest.raises(ValueError, match="need 8 classes"):
    data.split_by_class(images, labels, order, num_tasks=4, classes_per_task=2)


class _FakeCifar10(cifar.Cifar10, skip_registration=True):
  """The cifar10 builder (name, version, features) with a few generated examples."""

  name = "cifar10"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return None

  def _split_generators(self, dl_manager):
    # The real builder reads these names from batches.meta.txt.
    self.info.features["label"].names = [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return {"train": self._fake("train", 40), "test": self._fake("test", 20)}

  def _fake(self, split, count):
    for i in range(count):
      label = i % 10
      image = np.full((32, 32, 3), 20 * label, np.uint8)
      image[0, 0] = i  # unique pixel: the example id
      yield f"{split}_{i}", {"id": f"{split}_{i}", "image": Image.fromarray(image), "label": label}


def test_cifar10_layout_on_disk(tmp_path):
  _FakeCifar10(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  assert (tmp_path / "cifar10" / "3.0.2" / "dataset_info.json").exists()
  bench = data.load_benchmark(_data_config("cifar10", tmp_path, num_tasks=5, classes_per_task=2))
  assert bench.num_classes == 10 and bench.image_shape == (32, 32, 3)
  assert bench.class_names[:2] == ("airplane", "automobile")
  for t in range(5):
    train, test = bench.train[t], bench.test[t]
    assert len(train.labels) == 8 and len(test.labels) == 4
    assert set(train.labels) == {2 * t, 2 * t + 1}
    # Natural order: the image colour encodes the original label.
    np.testing.assert_array_equal(train.images[:, 5, 5, 0] // 20, train.labels)
  ids = np.concatenate([t.images[:, 0, 0, 0] for t in bench.train])
  assert sorted(ids) == list(range(40))  # every example lands in exactly one task


def test_missing_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not prepared.*tfds build cifar100"):
    data.load_split("cifar100", str(tmp_path), "train")


def test_synthetic_builder_and_seeded_split(tmp_path):
  config = _data_config("cpt_synthetic_shapes/tiny", tmp_path, num_tasks=3, classes_per_task=3,
                        seed=0)
  bench = data.load_benchmark(config)
  order = data.make_class_order(10, 0)
  assert bench.class_names == tuple(synthetic.CLASS_NAMES[c] for c in order[:9])
  for t in range(3):
    assert len(bench.train[t].labels) == 3 * 12 and len(bench.test[t].labels) == 3 * 6
    assert set(bench.train[t].labels) == {3 * t, 3 * t + 1, 3 * t + 2}
  # Images vary within a class (random pose, colour, texture).
  first = bench.train[0]
  same_class = first.images[first.labels == 0].astype(np.float32)
  assert np.abs(same_class[0] - same_class[1]).mean() > 10


def test_tiny_imagenet_from_folder(tmp_path):
  root = tmp_path / "downloads" / "manual" / "tiny-imagenet-200"
  wnids = [f"n{i:08d}" for i in range(200)]
  (root / "val" / "images").mkdir(parents=True)
  (root / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
  annotations = []
  rng = np.random.default_rng(0)
  for i, wnid in enumerate(wnids[:4]):
    folder = root / "train" / wnid / "images"
    folder.mkdir(parents=True)
    for j in range(2):
      Image.fromarray(np.full((64, 64, 3), 10 * i, np.uint8)).save(folder / f"{wnid}_{j}.JPEG")
    name = f"val_{i}.JPEG"
    Image.fromarray(rng.integers(0, 255, (64, 64), np.uint8)).save(root / "val" / "images" / name)
    annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")  # a greyscale image, as in the real set
  (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
  bench = data.load_benchmark(_data_config("cpt_tiny_imagenet", tmp_path, num_tasks=2,
                                           classes_per_task=2, test_split="validation"))
  assert bench.image_shape == (64, 64, 3)
  assert [len(t.labels) for t in bench.train] == [4, 4]
  assert [len(t.labels) for t in bench.test] == [2, 2]
  # Sorted wnids: class i is wnids[i]; JPEG keeps the flat colour within a few levels.
  task = bench.train[1]
  np.testing.assert_allclose(task.images[:, 32, 32, 0], 10 * task.labels, atol=3)
