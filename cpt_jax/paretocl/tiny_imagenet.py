"""`cpt_tiny_imagenet`: Tiny ImageNet (200 classes, 64x64) from a local folder.

Tiny ImageNet is not in TFDS core and nothing here downloads it. Place the unzipped
`tiny-imagenet-200/` folder (from http://cs231n.stanford.edu/tiny-imagenet-200.zip) at
`<data_dir>/downloads/manual/tiny-imagenet-200/`; the first run prepares it as array_record.
Splits: `train` (500 per class) and `validation` (50 per class, labelled; the official
test split has no labels and is not built).
"""
from __future__ import annotations

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

FOLDER = "tiny-imagenet-200"
IMAGE_SIZE = 64


class CptTinyImagenet(tfds.core.GeneratorBasedBuilder):
  """Tiny ImageNet read from the official folder layout."""

  name = "cpt_tiny_imagenet"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Unzip tiny-imagenet-200.zip so that `<data_dir>/downloads/manual/{FOLDER}/wnids.txt` "
      "exists (with train/ and val/ beside it).")

  # Nothing is downloaded, so there is no checksums file to find next to the code (TFDS's
  # lookup of that file also fails on editable installs).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=200),
        }),
        supervised_keys=("image", "label"))

  def _split_generators(self, dl_manager):
    root = epath.Path(dl_manager.manual_dir) / FOLDER
    if not (root / "wnids.txt").exists():
      raise FileNotFoundError(
          f"Tiny ImageNet not found at {root}: {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    # Sorted class ids, the usual ImageFolder order.
    wnids = sorted(line.strip() for line in (root / "wnids.txt").read_text().splitlines()
                   if line.strip())
    if len(wnids) != 200:
      raise ValueError(f"{root / 'wnids.txt'} lists {len(wnids)} classes, expected 200")
    index = {wnid: i for i, wnid in enumerate(wnids)}
    train = [(path, index[wnid]) for wnid in wnids
             for path in sorted((root / "train" / wnid / "images").glob("*.JPEG"))]
    val = []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
      if line.strip():
        file_name, wnid = line.split("\t")[:2]
        val.append((root / "val" / "images" / file_name, index[wnid]))
    return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

  def _generate_examples(self, items):
    for path, label in items:
      with Image.open(path) as image:  # some Tiny ImageNet JPEGs are greyscale
        yield path.name, {"image": image.convert("RGB"), "label": label}
