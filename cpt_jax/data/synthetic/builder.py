"""TFDS builder of the synthetic benchmark: one config per task, array_record files.

    build_synthetic("/tmp/synth")                      # 7 tasks + general, default sizes
    train = load_split("/tmp/synth", "gqa", "train")   # random-access source for grain
    train[0]  # {'id': b'gqa-train-000000', 'image': uint8 [56, 56, 3], 'question': b'...', ...}

Example i of a split depends only on (seed, task, split, i) and is stored at index i (TFDS
shuffling is off; grain shuffles), so a smaller build is a prefix of a bigger one with the same
seed and image size. Builds need no TensorFlow: images are PNG-encoded with PIL before TFDS
sees them.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from cpt_jax.data import schema
from cpt_jax.data.synthetic.tasks import Example, check_image_size, generate_example

# The seven continual tasks, then the held-out "general knowledge" set that plays MMMU's part.
SYNTHETIC_TASKS = (*schema.TASKS, "general")
SPLITS = ("train", "test")


def generate(
    task: str, split: str, num_examples: int, *, seed: int = 0, image_size: int = 56,
) -> Iterator[Example]:
  """The examples of one split, in index order; the i-th depends only on (seed, task, split, i)."""
  if task not in SYNTHETIC_TASKS:
    raise ValueError(f"unknown synthetic task {task!r}; known: {SYNTHETIC_TASKS}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
  stream = (seed, SYNTHETIC_TASKS.index(task), SPLITS.index(split))
  for i in range(num_examples):
    yield generate_example(task, np.random.default_rng((*stream, i)), image_size)


def _png(pixels: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="png", compress_level=1)
  return buffer.getvalue()


class CptSynthetic(tfds.core.GeneratorBasedBuilder):
  """Seven small image-QA tasks mirroring the continual post-training benchmark, plus `general`.

  One config per task. Sizes, seed and image size are builder kwargs, recorded in the
  dataset's metadata.json.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=task) for task in SYNTHETIC_TASKS]
  # Nothing is downloaded, so there is no checksums file beside the code. (TFDS' lookup of
  # that file also imports `importlib_resources`, which is not a dependency of this project.)
  code_path = None

  def __init__(
      self, *, image_size: int = 56, train_size: int = 3000, test_size: int = 300,
      seed: int = 0, **kwargs,
  ):
    if min(train_size, test_size) < 1:
      raise ValueError(f"train_size and test_size must be >= 1, got {train_size}, {test_size}")
    check_image_size(image_size)
    # Set before the base constructor, which calls `_info`.
    self.params = dict(image_size=image_size, train_size=train_size, test_size=test_size,
                       seed=seed)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=schema.features(),
        metadata=tfds.core.MetadataDict(self.params),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    return {
        "train": self._generate_examples("train", self.params["train_size"]),
        "test": self._generate_examples("test", self.params["test_size"]),
    }

  def _generate_examples(self, split: str, num_examples: int):
    task = self.builder_config.name
    examples = generate(task, split, num_examples, seed=self.params["seed"],
                        image_size=self.params["image_size"])
    for i, ex in enumerate(examples):
      key = f"{task}-{split}-{i:06d}"
      yield key, {
          "id": key,
          "task": task,
          "image": _png(ex.image),
          "question": ex.question,
          "options": list(ex.options),
          "answer": ex.answer,
      }


def build_synthetic(
    data_dir: str | os.PathLike,
    tasks: Sequence[str] = SYNTHETIC_TASKS,
    *,
    train_size: int = 3000,
    test_size: int = 300,
    seed: int = 0,
    image_size: int = 56,
) -> dict[str, tfds.core.DatasetBuilder]:
  """Builds (or reuses) each task under `data_dir`; returns the builders by task.

  A task already built in `data_dir` with other sizes, seed or image size is an error: TFDS
  would silently reuse it, so pick another `data_dir`.
  """
  unknown = [t for t in tasks if t not in SYNTHETIC_TASKS]
  if unknown:
    raise ValueError(f"unknown synthetic tasks {unknown}; known: {SYNTHETIC_TASKS}")
  builders = {}
  for task in tasks:
    builder = CptSynthetic(
        config=task, data_dir=os.fspath(data_dir), file_format="array_record",
        image_size=image_size, train_size=train_size, test_size=test_size, seed=seed)
    if builder.is_prepared():
      stored = json.loads((epath.Path(builder.data_dir) / "metadata.json").read_text())
      if stored != builder.params:
        raise ValueError(
            f"{builder.data_dir} holds task {task!r} built with {stored}, not "
            f"{builder.params}; use another data_dir")
    else:
      builder.download_and_prepare()
    builders[task] = builder
  return builders


def load_split(data_dir: str | os.PathLike, task: str, split: str):
  """Random-access source (`tfds.data_source`) of one built split; texts come back as bytes."""
  if task not in SYNTHETIC_TASKS:
    raise ValueError(f"unknown synthetic task {task!r}; known: {SYNTHETIC_TASKS}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
  builder = CptSynthetic(config=task, data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"task {task!r} is not built under {data_dir}; run build_synthetic({str(data_dir)!r})")
  return builder.as_data_source(split=split)  # what tfds.data_source returns
