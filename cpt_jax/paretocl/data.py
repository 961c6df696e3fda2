"""Class-incremental splits of TFDS image-classification datasets (features `image`, `label`).

A split is read once into host memory (uint8 images), its classes are put in an order
(natural or seeded permutation) and relabelled by position in that order, and task t gets
classes [t * classes_per_task, (t + 1) * classes_per_task) of the new label space.

Nothing is downloaded. Datasets defined by this package (`cpt_synthetic_shapes`,
`cpt_tiny_imagenet` from a local folder) are prepared on first use; any other TFDS dataset
must already be prepared under `data_dir` (array_record, or tfrecord when TensorFlow is
installed).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from cpt_jax.paretocl import synthetic, tiny_imagenet

# Builders whose data is generated or read from local files by this package.
_LOCAL_BUILDERS = (synthetic.SyntheticShapes.name, tiny_imagenet.CptTinyImagenet.name)
_READ_CHUNK = 1024


@dataclasses.dataclass(frozen=True)
class TaskSplit:
  images: np.ndarray  # [N, H, W, C] uint8
  labels: np.ndarray  # [N] int32, position of the class in the class order


@dataclasses.dataclass(frozen=True)
class ClassIncrementalBenchmark:
  train: list[TaskSplit]
  test: list[TaskSplit]
  class_order: np.ndarray  # [num_classes] original dataset label of each new label
  classes_per_task: int
  class_names: tuple[str, ...]  # names of the new labels, in order

  @property
  def num_tasks(self) -> int:
    return len(self.train)

  @property
  def num_classes(self) -> int:
    return self.num_tasks * self.classes_per_task

  @property
  def image_shape(self) -> tuple[int, ...]:
    return tuple(self.train[0].images.shape[1:])


def make_class_order(num_classes: int, seed: int | None) -> np.ndarray:
  """Natural order 0..C-1 when seed is None, else a seeded permutation."""
  if seed is None:
    return np.arange(num_classes)
  return np.random.default_rng(seed).permutation(num_classes)


def split_by_class(images: np.ndarray, labels: np.ndarray, class_order: np.ndarray,
                   num_tasks: int, classes_per_task: int) -> list[TaskSplit]:
  """Task t: examples whose class is among class_order[t * cpt : (t + 1) * cpt], relabelled.

  Examples of classes beyond num_tasks * classes_per_task are dropped; order within a task
  follows the input order.
  """
  needed = num_tasks * classes_per_task
  if num_tasks < 1 or classes_per_task < 1 or needed > len(class_order):
    raise ValueError(f"{num_tasks} tasks x {classes_per_task} classes need {needed} classes, "
                     f"the class order has {len(class_order)}")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"images {images.shape} and labels {labels.shape} differ in length")
  new_label = np.full(int(max(class_order.max(), labels.max())) + 1, -1, np.int64)
  new_label[class_order[:needed]] = np.arange(needed)
  relabelled = new_label[labels]
  tasks = []
  for t in range(num_tasks):
    keep = (relabelled >= t * classes_per_task) & (relabelled < (t + 1) * classes_per_task)
    tasks.append(TaskSplit(images=images[keep], labels=relabelled[keep].astype(np.int32)))
  return tasks


def _builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  if builder.name in _LOCAL_BUILDERS:
    # Generated here or read from <data_dir>/downloads/manual: nothing is downloaded.
    builder.download_and_prepare(file_format="array_record")
    return builder
  raise FileNotFoundError(
      f"TFDS dataset {name!r} is not prepared under data_dir={builder.data_dir_root!r} and "
      f"nothing is downloaded here. Prepare it where the internet is reachable, e.g. "
      f"`tfds build {name} --data_dir=DIR --file_format=array_record`, and copy DIR/"
      f"{builder.name} into {builder.data_dir_root}.")


def load_split(name: str, data_dir: str | None, split: str
               ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
  """Whole split in memory: images uint8 [N, H, W, C], labels int64 [N], class names."""
  builder = _builder(name, data_dir)
  features = builder.info.features
  missing = {"image", "label"} - set(features.keys())
  if missing:
    raise ValueError(f"{name} lacks features {sorted(missing)}; it has {sorted(features.keys())}")
  shape = features["image"].shape
  if None in shape:
    raise ValueError(f"{name} has images of variable shape {shape}; a fixed size is needed")
  if split not in builder.info.splits:
    raise ValueError(f"{name} has no split {split!r}; it has {sorted(builder.info.splits)}")
  names = tuple(features["label"].names)
  random_access = builder.info.available_file_formats() & set(
      tfds.core.file_adapters.FileFormat.with_random_access())
  if random_access:
    source = builder.as_data_source(split=split)
    images = np.empty((len(source), *shape), np.uint8)
    labels = np.empty((len(source),), np.int64)
    for start in range(0, len(source), _READ_CHUNK):
      rows = source.__getitems__(range(start, min(start + _READ_CHUNK, len(source))))
      for i, row in enumerate(rows, start):
        images[i] = row["image"]
        labels[i] = row["label"]
    return images, labels, names
  try:
    import tensorflow  # noqa: F401  (only needed to read tfrecord-prepared datasets)
  except ImportError as e:
    raise RuntimeError(
        f"{name} under {builder.data_dir} is stored as {builder.info.file_format}, which needs "
        f"TensorFlow to read. Install tensorflow, or convert it: `tfds convert_format "
        f"--dataset_dir={builder.data_dir} --out_file_format=array_record`.") from e
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return data["image"].astype(np.uint8), data["label"].astype(np.int64), names


def load_benchmark(data_config) -> ClassIncrementalBenchmark:
  """data_config: name, data_dir, train_split, test_split, num_tasks, classes_per_task,
  class_order_seed (None = natural order)."""
  train_images, train_labels, names = load_split(data_config.name, data_config.data_dir,
                                                 data_config.train_split)
  test_images, test_labels, _ = load_split(data_config.name, data_config.data_dir,
                                           data_config.test_split)
  order = make_class_order(len(names), data_config.class_order_seed)
  used = data_config.num_tasks * data_config.classes_per_task
  split = lambda images, labels: split_by_class(
      images, labels, order, data_config.num_tasks, data_config.classes_per_task)
  return ClassIncrementalBenchmark(
      train=split(train_images, train_labels), test=split(test_images, test_labels),
      class_order=order, classes_per_task=data_config.classes_per_task,
      class_names=tuple(names[c] for c in order[:used]))
