"""The synthetic benchmark: TFDS build, determinism, schema, answers re-derived from pixels, and
a text-only baseline that stays at chance."""
from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from cpt_jax.data import schema
from cpt_jax.data.synthetic import (
    SYNTHETIC_TASKS,
    build_synthetic,
    generate,
    load_split,
)
from cpt_jax.data.synthetic import draw as D

TRAIN, TEST = 40, 20


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("synthetic")
  build_synthetic(data_dir, train_size=TRAIN, test_size=TEST, seed=7)
  return data_dir


def _records(source) -> list[dict]:
  return [source[i] for i in range(len(source))]


def _by_id(source) -> dict[bytes, dict]:
  return {r["id"]: r for r in _records(source)}


# ----------------------------------------------------------------------------- build and schema


def test_every_task_builds_with_the_schema(built):
  assert set(SYNTHETIC_TASKS) == {*schema.TASKS, "general"}
  for task in SYNTHETIC_TASKS:
    for split, size in (("train", TRAIN), ("test", TEST)):
      source = load_split(built, task, split)
      assert len(source) == size
      for record in _records(source)[:5]:
        assert set(record) == set(schema.features().keys())
        assert record["task"].decode() == task
        assert record["id"].decode().startswith(f"{task}-{split}-")
        assert record["image"].shape == (56, 56, 3) and record["image"].dtype == np.uint8
        assert record["question"] and record["answer"]
        if task == "scienceqa":
          letters = "ABCDEFGH"[:len(record["options"])]
          assert len(record["options"]) >= 2 and record["answer"].decode() in letters
        else:
          assert len(record["options"]) == 0
  files = sorted(p.name for p in (built / "cpt_synthetic" / "gqa" / "1.0.0").iterdir())
  assert any(".array_record" in name for name in files), files


def test_records_equal_the_generator_in_order(built):
  source = load_split(built, "geometry3k", "test")
  for i, ex in enumerate(generate("geometry3k", "test", TEST, seed=7)):
    record = source[i]
    assert record["id"].decode() == f"geometry3k-test-{i:06d}"
    np.testing.assert_array_equal(record["image"], ex.image)  # PNG is lossless
    assert record["question"].decode() == ex.question and record["answer"].decode() == ex.answer


def test_same_seed_same_records_other_seed_differs(built, tmp_path):
  build_synthetic(tmp_path / "same", ["vizwiz"], train_size=TRAIN, test_size=TEST, seed=7)
  build_synthetic(tmp_path / "other", ["vizwiz"], train_size=TRAIN, test_size=TEST, seed=8)
  reference = _by_id(load_split(built, "vizwiz", "train"))
  same = _by_id(load_split(tmp_path / "same", "vizwiz", "train"))
  other = _by_id(load_split(tmp_path / "other", "vizwiz", "train"))
  assert reference.keys() == same.keys() == other.keys()
  n_differ = 0
  for key, record in reference.items():
    for field in ("question", "answer", "task"):
      assert same[key][field] == record[field]
    np.testing.assert_array_equal(same[key]["image"], record["image"])
    n_differ += not np.array_equal(other[key]["image"], record["image"])
  assert n_differ == len(reference)
  # Train and test are different streams.
  test_images = [r["image"] for r in _records(load_split(built, "vizwiz", "test"))]
  assert not any(np.array_equal(test_images[0], r["image"]) for r in reference.values())


def test_rebuild_with_other_parameters_is_an_error(built):
  with pytest.raises(ValueError, match="built with"):
    build_synthetic(built, ["gqa"], train_size=TRAIN, test_size=TEST, seed=8)
  build_synthetic(built, ["gqa"], train_size=TRAIN, test_size=TEST, seed=7)  # same: reused


def test_bad_arguments(built, tmp_path):
  with pytest.raises(ValueError, match="unknown synthetic task"):
    build_synthetic(tmp_path, ["mmmu"])
  with pytest.raises(ValueError, match="multiple of 28"):
    build_synthetic(tmp_path, ["gqa"], image_size=60)
  with pytest.raises(ValueError, match="unknown split"):
    load_split(built, "gqa", "validation")
  with pytest.raises(FileNotFoundError, match="not built"):
    load_split(tmp_path, "gqa", "train")


# ----------------------------------------------------------------------------- pixel readers
# Independent of the generators: they find objects by exact palette colour, classify shapes by
# their silhouettes, and read text with PIL's own bitmap font.


@dataclasses.dataclass
class Blob:
  color: str
  shape: str
  x: float  # centroid
  y: float
  area: int


def classify_shape(mask: np.ndarray) -> str:
  """Silhouette [h, w] (cropped to its bounding box) -> shape name."""
  h, w = mask.shape
  fill = mask.mean()
  widths = mask.sum(axis=1)
  band = max(1, h // 5)
  top, bottom = widths[:band].mean(), widths[-band:].mean()
  if fill > 0.9:
    return "square"
  if fill > 0.68:
    return "circle"
  if bottom > 0.75 * w and top < 0.45 * w:
    return "triangle"
  if fill < 0.45:
    return "star"
  # Diamond rows grow linearly from the top; a cross keeps its arm width.
  if abs(int(widths[h // 10]) - int(widths[h // 5])) <= max(1, w // 20):
    return "cross"
  return "diamond"


def blobs(image: np.ndarray) -> list[Blob]:
  found = []
  for name, rgb in D.COLORS.items():
    labels, n = ndimage.label(np.all(image == rgb, axis=-1))
    for i in range(1, n + 1):
      ys, xs = np.nonzero(labels == i)
      crop = labels[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == i
      found.append(Blob(name, classify_shape(crop), xs.mean(), ys.mean(), len(xs)))
  return found


@pytest.fixture(scope="module")
def font():
  return ImageFont.load_default_imagefont()


def render(font, text: str, scale: int) -> np.ndarray:
  _, _, w, h = font.getbbox(text)
  canvas = Image.new("1", (w, h), 0)
  ImageDraw.Draw(canvas).text((0, 0), text, fill=1, font=font)
  return np.kron(np.asarray(canvas, dtype=bool), np.ones((scale, scale), dtype=bool))


def trim(mask: np.ndarray) -> np.ndarray:
  ys, xs = np.nonzero(mask)
  return mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def read_numbers(font, image: np.ndarray, scale: int) -> list[int]:
  """Integers written in black, found by matching each digit's full glyph cell."""
  ink = np.all(image == 0, axis=-1)
  summed = np.pad(ink.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  hits = []
  for digit in "0123456789":
    glyph = render(font, digit, scale)
    h, w = glyph.shape
    # Ink count of every h x w window, then exact comparison where the count agrees.
    counts = summed[h:, w:] - summed[:-h, w:] - summed[h:, :-w] + summed[:-h, :-w]
    for y, x in zip(*np.nonzero(counts == glyph.sum())):
      if np.array_equal(ink[y:y + h, x:x + w], glyph):
        hits.append((int(y), int(x), digit))
  numbers, previous = [], None
  for y, x, digit in sorted(hits):
    if previous and previous[0] == y and x - previous[1] == 6 * scale:
      numbers[-1] += digit
    else:
      numbers.append(digit)
    previous = (y, x)
  return [int(n) for n in numbers]


def texture_kind(image: np.ndarray) -> str:
  rgb = image.astype(np.int64)
  codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
  colors = np.unique(codes)
  assert len(colors) == 2, "a texture has two colours"
  darker = min(colors, key=lambda c: (c >> 16) + ((c >> 8) & 255) + (c & 255))
  ink = codes == darker
  if (ink == ink[:1]).all() or (ink == ink[:, :1]).all():
    return "stripes"
  if ink.all(axis=1).any() and ink.all(axis=0).any():
    return "grid"
  return "checks" if ink.mean() > 0.4 else "dots"


# ----------------------------------------------------------------------------- answers from pixels


def _the(found: list[Blob], description: str) -> Blob:
  color, shape = description.split()
  (blob,) = [b for b in found if (b.color, b.shape) == (color, shape)]
  return blob


def check_scienceqa(ex, font, scale):
  chosen = ex.options["ABCDEFGH".index(ex.answer)]
  found = blobs(ex.image)
  if ex.template == "north":
    assert chosen == min(ex.options, key=lambda o: _the(found, o).y)
  elif ex.template == "largest":
    assert chosen == max(ex.options, key=lambda o: _the(found, o).area)
  elif ex.template == "shape_of":
    color = re.fullmatch(r"What shape is the (\w+) object\?", ex.question)[1]
    assert [b.shape for b in found if b.color == color] == [chosen]
  else:
    seen = {b.color for b in found}
    assert chosen in seen and not seen & (set(ex.options) - {chosen})


def check_textvqa(ex, font, scale):
  match = re.fullmatch(r"What is written on the (\w+) sign\?", ex.question)
  present = [c for c, rgb in D.COLORS.items() if np.all(ex.image == rgb, axis=-1).any()]
  color = match[1] if match else present[0]
  assert len(present) == (2 if match else 1)
  sign = np.all(ex.image == D.COLORS[color], axis=-1)
  ys, xs = np.nonzero(sign)
  text = ~sign[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
  np.testing.assert_array_equal(trim(text), trim(render(font, ex.answer, scale)))


def check_vizwiz(ex, font, scale):
  found = blobs(ex.image)
  if ex.template == "color_of_shape":
    shape = re.fullmatch(r"What color is the (\w+)\?", ex.question)[1]
    seen = [b.color for b in found if b.shape == shape]
  else:
    color = re.fullmatch(r"What shape is the (\w+) object\?", ex.question)[1]
    seen = [b.shape for b in found if b.color == color]
  assert seen == ([] if ex.answer == "unanswerable" else [ex.answer])


def check_gqa(ex, font, scale):
  found = blobs(ex.image)
  half_cell = ex.image.shape[0] / 8
  if ex.template == "left_right":
    a, b = re.fullmatch(r"Is the (\w+ \w+) to the left or to the right of the (\w+ \w+)\?",
                        ex.question).groups()
    assert ex.answer == ("left" if _the(found, a).x < _the(found, b).x else "right")
  elif ex.template == "above_below":
    a, b = re.fullmatch(r"Is the (\w+ \w+) above or below the (\w+ \w+)\?", ex.question).groups()
    assert ex.answer == ("above" if _the(found, a).y < _the(found, b).y else "below")
  elif ex.template == "color_left_of":
    ref = _the(found, re.fullmatch(r"What color is the object to the left of the (\w+ \w+)\?",
                                   ex.question)[1])
    assert [b.color for b in found if b.x < ref.x - half_cell] == [ex.answer]
  else:
    ref = _the(found, re.fullmatch(r"What shape is above the (\w+ \w+)\?", ex.question)[1])
    assert [b.shape for b in found if b.y < ref.y - half_cell] == [ex.answer]


def check_geometry3k(ex, font, scale):
  numbers = read_numbers(font, ex.image, scale)
  assert len(numbers) == 2, numbers
  a, b = numbers
  expected = {
      "rect_area": a * b, "rect_perimeter": 2 * (a + b), "segment_sum": a + b,
      "right_triangle_area": a * b / 2, "triangle_angle": 180 - a - b,
  }[ex.template]
  assert float(ex.answer) == expected


def check_pathvqa(ex, font, scale):
  kind = texture_kind(ex.image)
  if ex.template == "yes_no":
    asked = {"striped": "stripes", "dotted": "dots", "checkerboard": "checks", "grid": "grid"}[
        re.fullmatch(r"Does the tissue show an? (\w+) pattern\?", ex.question)[1]]
    assert ex.answer == ("yes" if kind == asked else "no")
  else:
    assert ex.answer == kind


def check_superclevr(ex, font, scale):
  found = blobs(ex.image)
  words = ex.question.split()[2:-2]  # "How many <...> are there?"
  color = words[0] if words[0] in D.COLORS else None
  shape = None if words[-1] == "objects" else words[-1][:-1]
  assert ex.answer == str(sum(
      (color is None or b.color == color) and (shape is None or b.shape == shape) for b in found))


def check_general(ex, font, scale):
  background = [c for c, rgb in D.COLORS.items() if (ex.image[0, 0] == rgb).all()]
  found = [b for b in blobs(ex.image) if b.color not in background]
  (shape,) = found
  answer = {"shape": shape.shape, "color": shape.color, "background": background[0]}[ex.template]
  assert ex.answer == answer


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


@pytest.mark.parametrize("size,count", [(56, 120), (84, 30), (112, 30)])
@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_answers_rederived_from_pixels(task, size, count, font):
  for ex in generate(task, "train", count, seed=3, image_size=size):
    assert ex.image.shape == (size, size, 3)
    CHECKS[task](ex, font, D.text_scale(size))


def test_checks_catch_wrong_answers(font):
  """The pixel readers above reject a corrupted answer (so they can fail)."""
  wrong = {"scienceqa": "Z", "textvqa": "zzz", "vizwiz": "teal", "gqa": "teal",
           "geometry3k": "-1", "pathvqa": "maybe", "superclevr": "9", "general": "teal"}
  for task in SYNTHETIC_TASKS:
    ex = next(generate(task, "train", 1, seed=3))
    with pytest.raises((AssertionError, ValueError)):
      CHECKS[task](dataclasses.replace(ex, answer=wrong[task]), font, 1)


# ----------------------------------------------------------------------------- text-only baseline


def _text_only_report(task: str, n_train: int = 600, n_test: int = 300) -> dict[str, float]:
  train = list(generate(task, "train", n_train, seed=11))
  test = list(generate(task, "test", n_test, seed=11))
  key = lambda ex: (ex.question, ex.options)
  by_text, by_template = collections.defaultdict(collections.Counter), collections.defaultdict(
      collections.Counter)
  for ex in train:
    by_text[key(ex)][ex.answer] += 1
    by_template[ex.template][ex.answer] += 1
  top = lambda counter: counter.most_common(1)[0][0]

  def text_only(ex):  # unseen question texts fall back to their template's majority
    return top(by_text[key(ex)]) if key(ex) in by_text else top(by_template[ex.template])

  # Chance: a uniform guess among the options, or among the answers its template ever gives.
  chance = [1 / len(ex.options) if ex.options else 1 / len(by_template[ex.template])
            for ex in test]
  return dict(
      text_only=float(np.mean([text_only(ex) == ex.answer for ex in test])),
      chance=float(np.mean(chance)),
      distinct_questions=len(by_text),
  )


@pytest.mark.parametrize("task", SYNTHETIC_TASKS)
def test_question_text_alone_is_at_chance(task):
  report = _text_only_report(task)
  print(task, report)
  assert report["text_only"] <= report["chance"] + 0.1, report
