"""`cpt_synthetic_shapes`: a procedurally generated 10-class image-classification dataset.

Made by the project so that class-incremental learning runs end to end without downloads.
Each RGB image shows one bright shape (the class) at a random position, size and rotation
of at most 20 degrees, solid or striped in a random colour, over a dark random colour
gradient with pixel noise. Colour and texture carry no class information, so a model has
to learn shape; some classes differ only in outline or orientation (square vs diamond,
plus vs cross, circle vs ellipse vs ring), which keeps it non-trivial.

Configs: `default` (16x16, 1000 train / 200 test per class: a class-incremental run takes
minutes on 2 CPU cores), `cifar` (32x32, CIFAR-10 sized: 5000 / 1000 per class) and
`tiny` (16x16, 12 / 6 per class, for tests).

Layout matches TFDS image classification (features `image`, `label`), written as
array_record so it is read with `tfds.data_source` and needs no TensorFlow.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

CLASS_NAMES = ("circle", "square", "triangle", "plus", "ring", "diamond", "ellipse", "cross",
               "hollow_square", "two_dots")


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Membership of shape `cls` in shape-local coordinates (u, v), unit radius."""
  au, av = np.abs(u), np.abs(v)
  if cls == 0:
    return u**2 + v**2 <= 1.0
  if cls == 1:
    return np.maximum(au, av) <= 0.8
  if cls == 2:  # upward triangle
    return (v <= 0.7) & (v >= -0.9 + 2.2 * au * 0.8)
  if cls == 3:
    return ((au <= 0.3) & (av <= 1.0)) | ((av <= 0.3) & (au <= 1.0))
  if cls == 4:
    r2 = u**2 + v**2
    return (r2 <= 1.0) & (r2 >= 0.45)
  if cls == 5:
    return au + av <= 1.0
  if cls == 6:
    return (u / 1.0)**2 + (v / 0.5)**2 <= 1.0
  if cls == 7:  # plus rotated by 45 degrees
    p, q = (u + v) / np.sqrt(2), (u - v) / np.sqrt(2)
    return ((np.abs(p) <= 0.25) & (np.abs(q) <= 1.0)) | ((np.abs(q) <= 0.25) & (np.abs(p) <= 1.0))
  if cls == 8:
    m = np.maximum(au, av)
    return (m <= 0.85) & (m >= 0.55)
  if cls == 9:
    return ((u - 0.5)**2 + v**2 <= 0.16) | ((u + 0.5)**2 + v**2 <= 0.16)
  raise ValueError(f"unknown shape class {cls}")


def render(cls: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
  """One image of class `cls`: uint8 [size, size, 3], a 32x32 frame sampled at size^2 points."""
  y, x = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) * (32.0 / size)  # 32x32 frame
  # Background: a dark gradient between two random colours.
  c0, c1 = rng.uniform(0, 0.4, (2, 3))
  direction = rng.uniform(0, 2 * np.pi)
  t = ((x * np.cos(direction) + y * np.sin(direction)) / 32 + 1) / 2
  img = c0 + (c1 - c0) * t[..., None]
  # The shape: random centre, radius and a rotation of at most 20 degrees.
  radius = rng.uniform(0.28, 0.4) * 32
  cx, cy = rng.uniform(radius * 0.9, 32 - radius * 0.9, 2)
  angle = rng.uniform(-0.35, 0.35)
  dx, dy = (x - cx) / radius, (y - cy) / radius
  u = dx * np.cos(angle) + dy * np.sin(angle)
  v = -dx * np.sin(angle) + dy * np.cos(angle)
  mask = _shape_mask(cls, u, v)
  # Fill: a random bright colour (one channel at least 0.8), solid or striped.
  fill = rng.uniform(0.3, 1.0, 3)
  fill[rng.integers(3)] = rng.uniform(0.8, 1.0)
  background = img.mean(axis=(0, 1))
  if rng.random() < 0.5:
    period = rng.uniform(4, 8)
    stripes = ((x * np.cos(angle + 1.0) + y * np.sin(angle + 1.0)) % period) < period / 2
    shape_pixels = np.where(stripes[..., None], fill, 0.8 * fill + 0.2 * background)
  else:
    shape_pixels = np.broadcast_to(fill, img.shape)
  img = np.where(mask[..., None], shape_pixels, img)
  img = img + rng.normal(0, 0.04, img.shape)
  return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


@dataclasses.dataclass
class SyntheticShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 16
  train_per_class: int = 1000
  test_per_class: int = 200


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
  """10 classes of procedurally generated shape images."""

  name = "cpt_synthetic_shapes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = [
      SyntheticShapesConfig(name="default", description="16x16, 1000 train / 200 test per class."),
      SyntheticShapesConfig(name="cifar", description="32x32, 5000 train / 1000 test per class.",
                            image_size=32, train_per_class=5000, test_per_class=1000),
      SyntheticShapesConfig(name="tiny", description="16x16, 12 train / 6 test per class.",
                            train_per_class=12, test_per_class=6),
  ]
  DEFAULT_CONFIG_NAME = "default"

  # Nothing is downloaded, so there is no checksums file to find next to the code (TFDS's
  # lookup of that file also fails on editable installs).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is generated locally.
    return {"train": self._generate_examples("train", self.builder_config.train_per_class),
            "test": self._generate_examples("test", self.builder_config.test_per_class)}

  def _generate_examples(self, split: str, per_class: int):
    # Independent, reproducible streams per split.
    rng = np.random.default_rng({"train": 0, "test": 1}[split])
    for i in range(per_class * len(CLASS_NAMES)):
      label = i % len(CLASS_NAMES)
      image = render(label, rng, self.builder_config.image_size)
      yield f"{split}_{i}", {"image": Image.fromarray(image), "label": label}
