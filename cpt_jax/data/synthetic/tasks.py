"""Generators of the synthetic tasks: one small image-QA task per real continual-learning task.

Each generator draws one example from a numpy Generator. Every question template samples its
answer uniformly from the template's answer set first, then draws an image that makes it true,
so the question text alone carries no information about the answer.

| task       | mirrors                      | answer                                   |
|------------|------------------------------|------------------------------------------|
| scienceqa  | ScienceQA multiple choice    | option letter (options in `options`)     |
| textvqa    | reading text in the image    | a word rendered in PIL's bitmap font     |
| vizwiz     | answer or "unanswerable"     | colour / shape, or "unanswerable"        |
| gqa        | relations between objects    | left/right, above/below, colour, shape   |
| geometry3k | labelled figure, math answer | an integer                               |
| pathvqa    | texture (tissue) questions   | yes/no, or the pattern name              |
| superclevr | counting with attributes     | "0".."4"                                 |
| general    | plays MMMU's held-out part   | shape or colour name                     |
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from cpt_jax.data.synthetic import draw as D

LETTERS = "ABCDEFGH"
UNANSWERABLE = "unanswerable"
# Short words for textvqa; every one fits a 56-pixel image in the 6-pixel bitmap font.
WORDS = (
    "cat", "dog", "sun", "map", "bus", "tea", "pen", "box", "key", "car",
    "cup", "hat", "egg", "fox", "owl", "stop", "open", "exit", "milk", "book",
    "door", "fish", "park", "rain", "star", "tree", "moon", "shop", "lamp", "road",
)
# Dark signs carry white text, light signs black text.
SIGN_TEXT = {
    "red": D.TEXT_WHITE, "green": D.TEXT_WHITE, "blue": D.TEXT_WHITE, "purple": D.TEXT_WHITE,
    "yellow": D.TEXT_BLACK, "orange": D.TEXT_BLACK,
}
PATTERN_QUESTIONS = {
    "stripes": "Does the tissue show a striped pattern?",
    "dots": "Does the tissue show a dotted pattern?",
    "checks": "Does the tissue show a checkerboard pattern?",
    "grid": "Does the tissue show a grid pattern?",
}


@dataclasses.dataclass(frozen=True, eq=False)
class Example:
  image: np.ndarray  # [H, W, 3] uint8
  question: str
  answer: str
  options: tuple[str, ...] = ()
  template: str = ""  # question kind, for balance checks; not written to datasets


Generator = Callable[[np.random.Generator, int], Example]
GENERATORS: dict[str, Generator] = {}


def register(task: str) -> Callable[[Generator], Generator]:
  def wrap(fn: Generator) -> Generator:
    GENERATORS[task] = fn
    return fn
  return wrap


def check_image_size(image_size: int) -> None:
  if image_size < 56 or image_size % 28:
    raise ValueError(f"image_size must be a multiple of 28 and >= 56, got {image_size}")


def generate_example(task: str, rng: np.random.Generator, image_size: int) -> Example:
  if task not in GENERATORS:
    raise ValueError(f"unknown synthetic task {task!r}; known: {tuple(GENERATORS)}")
  check_image_size(image_size)
  return GENERATORS[task](rng, image_size)


# ----------------------------------------------------------------------------- helpers


def _pick(rng: np.random.Generator, items: Sequence[str], exclude: Sequence[str] = ()) -> str:
  pool = [x for x in items if x not in exclude]
  return pool[int(rng.integers(len(pool)))]


def _pick_many(
    rng: np.random.Generator, items: Sequence[str], n: int, exclude: Sequence[str] = ()
) -> list[str]:
  pool = [x for x in items if x not in exclude]
  return [pool[int(i)] for i in rng.choice(len(pool), size=n, replace=False)]


def _distinct_objects(
    rng: np.random.Generator, n: int, exclude: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
  """n distinct (color, shape) pairs, none in `exclude`."""
  pairs = [(c, s) for c in D.COLOR_NAMES for s in D.SHAPES if (c, s) not in exclude]
  return [pairs[int(i)] for i in rng.choice(len(pairs), size=n, replace=False)]


def _describe(obj: tuple[str, str]) -> str:
  return f"{obj[0]} {obj[1]}"


def _lettered(
    rng: np.random.Generator, correct: str, distractors: Sequence[str]
) -> tuple[tuple[str, ...], str]:
  """Shuffled options and the letter of `correct` (uniform over positions)."""
  options = [correct, *distractors]
  options = [options[int(i)] for i in rng.permutation(len(options))]
  return tuple(options), LETTERS[options.index(correct)]


def _cells_where(
    rng: np.random.Generator, n: int, allowed: Callable[[tuple[int, int]], bool]
) -> list[tuple[int, int]]:
  cells = [(r, c) for r in range(D.GRID) for c in range(D.GRID) if allowed((r, c))]
  return [cells[int(i)] for i in rng.choice(len(cells), size=n, replace=False)]


def _scene(
    rng: np.random.Generator, size: int, objects: list[tuple[str, str, tuple[int, int]]]
) -> Image.Image:
  image = D.gray_background(rng, size)
  D.draw_scene(image, rng, objects)
  return image


# ----------------------------------------------------------------------------- scienceqa


@register("scienceqa")
def scienceqa(rng: np.random.Generator, size: int) -> Example:
  """Multiple choice about a small scene; the correct option's position is uniform."""
  kind = ("north", "largest", "shape_of", "color_seen")[int(rng.integers(4))]
  if kind == "north":
    n = int(rng.integers(2, 5))
    objects = _distinct_objects(rng, n)
    rows = rng.choice(D.GRID, size=n, replace=False)
    cells = [(int(r), int(rng.integers(D.GRID))) for r in rows]
    image = _scene(rng, size, [(c, s, cell) for (c, s), cell in zip(objects, cells)])
    top = int(np.argmin(rows))
    options, answer = _lettered(
        rng, _describe(objects[top]), [_describe(o) for i, o in enumerate(objects) if i != top])
    question = "Which object is farthest north? North is at the top of the picture."
  elif kind == "largest":
    # Objects in a 2x2 layout with three clearly different sizes (area ratio > 2 per level).
    n = int(rng.integers(2, 4))
    objects = _distinct_objects(rng, n)
    levels = rng.choice(3, size=n, replace=False)
    cells = rng.choice(4, size=n, replace=False)
    image = D.gray_background(rng, size)
    canvas = ImageDraw.Draw(image)
    for (color, shape), level, cell in zip(objects, levels, cells):
      center = D.cell_center(rng, (int(cell) // 2, int(cell) % 2), size, grid=2)
      radius = (0.15, 0.27, 0.40)[int(level)] * D.cell_size(size, grid=2)
      D.draw_shape(canvas, shape, center, radius, D.COLORS[color])
    big = int(np.argmax(levels))
    options, answer = _lettered(
        rng, _describe(objects[big]), [_describe(o) for i, o in enumerate(objects) if i != big])
    question = "Which object is the largest?"
  elif kind == "shape_of":
    n = int(rng.integers(1, 4))
    colors = _pick_many(rng, D.COLOR_NAMES, n)
    shapes = [_pick(rng, D.SHAPES) for _ in range(n)]
    image = _scene(rng, size, list(zip(colors, shapes, D.sample_cells(rng, n))))
    distractors = _pick_many(rng, D.SHAPES, int(rng.integers(1, 3)), exclude=[shapes[0]])
    options, answer = _lettered(rng, shapes[0], distractors)
    question = f"What shape is the {colors[0]} object?"
  else:  # color_seen: exactly one option colour appears in the picture
    n = int(rng.integers(1, 3))
    colors = _pick_many(rng, D.COLOR_NAMES, n)
    shapes = [_pick(rng, D.SHAPES) for _ in range(n)]
    image = _scene(rng, size, list(zip(colors, shapes, D.sample_cells(rng, n))))
    seen = colors[int(rng.integers(n))]
    distractors = _pick_many(rng, D.COLOR_NAMES, int(rng.integers(1, 4)), exclude=colors)
    options, answer = _lettered(rng, seen, distractors)
    question = "Which of these colors can you see in the picture?"
  return Example(np.asarray(image), question, answer, options, template=kind)


# ----------------------------------------------------------------------------- textvqa


def _sign(
    pixels: np.ndarray, rng: np.random.Generator, word: str, color: str,
    rows: tuple[int, int], scale: int,
) -> None:
  """Draws a `color` sign holding `word`, with its top edge at a random y in [rows)."""
  margin = 2 * scale
  h, w = D.text_mask(word, scale).shape
  sign_h, sign_w = h + 2 * margin, w + 2 * margin
  size = pixels.shape[0]
  x = int(rng.integers(0, size - sign_w + 1))
  y = int(rng.integers(rows[0], min(rows[1], size - sign_h) + 1))
  pixels[y:y + sign_h, x:x + sign_w] = D.COLORS[color]
  D.paste_text(pixels, word, (x + margin, y + margin), SIGN_TEXT[color], scale)


@register("textvqa")
def textvqa(rng: np.random.Generator, size: int) -> Example:
  pixels = np.array(D.gray_background(rng, size))
  scale = D.text_scale(size)
  sign_h = (11 + 4) * scale
  if rng.random() < 0.5:
    word = _pick(rng, WORDS)
    _sign(pixels, rng, word, _pick(rng, D.COLOR_NAMES), (0, size - sign_h), scale)
    return Example(pixels, "What word is written on the sign?", word, template="one_sign")
  words = _pick_many(rng, WORDS, 2)
  colors = _pick_many(rng, D.COLOR_NAMES, 2)
  half = size // 2
  top = int(rng.integers(2))  # which sign is in the upper half
  for i in range(2):
    rows = (0, half - sign_h) if i == top else (half, size - sign_h)
    _sign(pixels, rng, words[i], colors[i], rows, scale)
  return Example(
      pixels, f"What is written on the {colors[0]} sign?", words[0], template="two_signs")


# ----------------------------------------------------------------------------- vizwiz


@register("vizwiz")
def vizwiz(rng: np.random.Generator, size: int) -> Example:
  """Asks about an object that is visible, absent, or hidden under a thumb-like occluder."""
  ask_color = rng.random() < 0.5  # "What color is the <shape>?" vs "What shape is the <color> object?"
  values = D.COLOR_NAMES if ask_color else D.SHAPES
  answer = ([*values, UNANSWERABLE])[int(rng.integers(len(values) + 1))]
  n = int(rng.integers(2, 5))
  cells = D.sample_cells(rng, n + 1)  # the last cell may get a decoy occluder
  if ask_color:
    shape = _pick(rng, D.SHAPES)
    question, template = f"What color is the {shape}?", "color_of_shape"
    others = [(_pick(rng, D.COLOR_NAMES), _pick(rng, D.SHAPES, exclude=[shape])) for _ in range(n)]
    target = (answer if answer != UNANSWERABLE else _pick(rng, D.COLOR_NAMES), shape)
  else:
    color = _pick(rng, D.COLOR_NAMES)
    question, template = f"What shape is the {color} object?", "shape_of_color"
    others = [(_pick(rng, D.COLOR_NAMES, exclude=[color]), _pick(rng, D.SHAPES)) for _ in range(n)]
    target = (color, answer if answer != UNANSWERABLE else _pick(rng, D.SHAPES))
  absent = answer == UNANSWERABLE and rng.random() < 0.5
  objects = others if absent else [target, *others[1:]]
  image = _scene(rng, size, [(c, s, cell) for (c, s), cell in zip(objects, cells)])
  if answer == UNANSWERABLE and not absent:
    D.cover_cell(image, cells[0])  # the target is there, but hidden
  elif rng.random() < 0.3:
    D.cover_cell(image, cells[-1])  # a decoy occluder over an empty cell
  return Example(np.asarray(image), question, answer, template=template)


# ----------------------------------------------------------------------------- gqa


@register("gqa")
def gqa(rng: np.random.Generator, size: int) -> Example:
  """Spatial relations on a 4x4 layout; cells define left/right (columns), above/below (rows)."""
  kind = ("left_right", "above_below", "color_left_of", "shape_above")[int(rng.integers(4))]
  n = int(rng.integers(3, 5))
  if kind in ("left_right", "above_below"):
    axis = 1 if kind == "left_right" else 0
    while True:
      cells = D.sample_cells(rng, n)
      if cells[0][axis] != cells[1][axis]:
        break
    objects = _distinct_objects(rng, n)
    a, b = _describe(objects[0]), _describe(objects[1])
    before = cells[0][axis] < cells[1][axis]
    if axis == 1:
      question, answer = f"Is the {a} to the left or to the right of the {b}?", (
          "left" if before else "right")
    else:
      question, answer = f"Is the {a} above or below the {b}?", "above" if before else "below"
  else:
    # The target is the only object left of (above) the reference; others are not.
    axis = 1 if kind == "color_left_of" else 0
    line = int(rng.integers(1, D.GRID))  # the reference's column (row); only the target is before it
    across = int(rng.integers(D.GRID))
    ref = (across, line) if axis == 1 else (line, across)
    target = _cells_where(rng, 1, lambda cell: cell[axis] < line)[0]
    rest = _cells_where(rng, n - 2, lambda cell: cell[axis] >= line and cell != ref)
    cells = [target, ref, *rest]
    target_obj = (_pick(rng, D.COLOR_NAMES), _pick(rng, D.SHAPES))
    objects = [target_obj, *_distinct_objects(rng, n - 1, exclude=[target_obj])]
    ref_name = _describe(objects[1])
    if axis == 1:
      question, answer = f"What color is the object to the left of the {ref_name}?", target_obj[0]
    else:
      question, answer = f"What shape is above the {ref_name}?", target_obj[1]
  image = _scene(rng, size, [(c, s, cell) for (c, s), cell in zip(objects, cells)])
  return Example(np.asarray(image), question, answer, template=kind)


# ----------------------------------------------------------------------------- geometry3k


def _label(pixels: np.ndarray, text: str, center: tuple[float, float], scale: int) -> None:
  h, w = D.text_mask(text, scale).shape
  size = pixels.shape[0]
  x = min(max(int(round(center[0] - w / 2)), 0), size - w)
  y = min(max(int(round(center[1] - h / 2)), 0), size - h)
  D.paste_text(pixels, text, (x, y), D.TEXT_BLACK, scale)


@register("geometry3k")
def geometry3k(rng: np.random.Generator, size: int) -> Example:
  """Figures (not to scale) with labelled lengths or angles; the answer is an integer."""
  kind = ("rect_area", "rect_perimeter", "segment_sum", "right_triangle_area",
          "triangle_angle")[int(rng.integers(5))]
  u = D.unit(size)
  scale = D.text_scale(size)
  image = Image.new("RGB", (size, size), (250, 250, 250))
  canvas = ImageDraw.Draw(image)
  width = max(1, int(round(u)))
  labels: list[tuple[str, tuple[float, float]]] = []
  if kind in ("rect_area", "rect_perimeter"):
    x0, y0 = rng.integers(17, 21), rng.integers(4, 11)
    x1, y1 = x0 + rng.integers(24, 53 - x0), y0 + rng.integers(16, 42 - y0)
    canvas.rectangle([x0 * u, y0 * u, x1 * u, y1 * u], outline=D.LINE_GRAY, width=width)
    w, h = (int(v) for v in rng.integers(2, 16, size=2))
    labels = [(str(w), ((x0 + x1) / 2, y1 + 8)), (str(h), (x0 - 9, (y0 + y1) / 2))]
    if kind == "rect_area":
      question, answer = "What is the area of the rectangle?", w * h
    else:
      question, answer = "What is the perimeter of the rectangle?", 2 * (w + h)
  elif kind == "segment_sum":
    y, xa, xb = 28, 4, 52
    xc = int(rng.integers(20, 37))
    canvas.line([xa * u, y * u, xb * u, y * u], fill=D.LINE_GRAY, width=width)
    for x in (xa, xc, xb):
      canvas.line([x * u, (y - 3) * u, x * u, (y + 3) * u], fill=D.LINE_GRAY, width=width)
    a, b = (int(v) for v in rng.integers(1, 21, size=2))
    labels = [(str(a), ((xa + xc) / 2, y - 9)), (str(b), ((xc + xb) / 2, y - 9)),
              ("A", (xa + 2, y + 10)), ("C", (xc, y + 10)), ("B", (xb - 2, y + 10))]
    question, answer = "Point C lies on segment AB. What is the length of AB?", a + b
  elif kind == "right_triangle_area":
    x0, y0 = rng.integers(17, 21), rng.integers(4, 11)
    x1, y1 = x0 + rng.integers(22, 53 - x0), y0 + rng.integers(18, 42 - y0)
    canvas.polygon([(x0 * u, y0 * u), (x0 * u, y1 * u), (x1 * u, y1 * u)], outline=D.LINE_GRAY,
                   width=width)
    canvas.rectangle([x0 * u, (y1 - 4) * u, (x0 + 4) * u, y1 * u], outline=D.LINE_GRAY, width=1)
    while True:
      a, b = (int(v) for v in rng.integers(2, 16, size=2))
      if a * b % 2 == 0:
        break
    labels = [(str(a), (x0 - 9, (y0 + y1) / 2)), (str(b), ((x0 + x1) / 2, y1 + 8))]
    question, answer = "What is the area of the right triangle?", a * b // 2
  else:  # triangle_angle: two angles labelled, the third is x
    apex_x = int(rng.integers(22, 35))
    base_y, apex_y = 48, 6
    canvas.polygon([(4 * u, base_y * u), (52 * u, base_y * u), (apex_x * u, apex_y * u)],
                   outline=D.LINE_GRAY, width=width)
    a, b = (int(v) for v in 5 * rng.integers(6, 16, size=2))
    # Angle labels sit inside the corners, 7 units above the base.
    left_x = 4 + (apex_x - 4) * 7 / (base_y - apex_y)
    right_x = 52 - (52 - apex_x) * 7 / (base_y - apex_y)
    labels = [(str(a), (left_x + 10, base_y - 7)), (str(b), (right_x - 10, base_y - 7)),
              ("x", (apex_x, apex_y + 12))]
    question, answer = "What is the value of x in the triangle?", 180 - a - b
  pixels = np.array(image)
  for text, (cx, cy) in labels:
    _label(pixels, text, (cx * u, cy * u), scale)
  return Example(pixels, question, str(answer), template=kind)


# ----------------------------------------------------------------------------- pathvqa


@register("pathvqa")
def pathvqa(rng: np.random.Generator, size: int) -> Example:
  """Yes/no (70%) or open questions about a full-image stain-like texture."""
  if rng.random() < 0.7:
    asked = _pick(rng, D.PATTERNS)
    yes = rng.random() < 0.5
    shown = asked if yes else _pick(rng, D.PATTERNS, exclude=[asked])
    return Example(D.texture(rng, shown, size), PATTERN_QUESTIONS[asked], "yes" if yes else "no",
                   template="yes_no")
  shown = _pick(rng, D.PATTERNS)
  return Example(D.texture(rng, shown, size), "What pattern does the tissue show?", shown,
                 template="which_pattern")


# ----------------------------------------------------------------------------- superclevr


@register("superclevr")
def superclevr(rng: np.random.Generator, size: int) -> Example:
  """Counting objects matching a colour, a shape, or both; distractors share one attribute."""
  kind = ("color_shape", "shape", "color")[int(rng.integers(3))]
  count = int(rng.integers(0, 5))
  color, shape = _pick(rng, D.COLOR_NAMES), _pick(rng, D.SHAPES)
  n_distractors = int(rng.integers(2, 6))
  objects = []
  for _ in range(n_distractors):
    if kind == "color_shape":
      # Same colour other shape, same shape other colour, or neither.
      mode = int(rng.integers(3))
      d_color = color if mode == 0 else _pick(rng, D.COLOR_NAMES, exclude=[color])
      d_shape = shape if mode == 1 else _pick(rng, D.SHAPES, exclude=[shape])
    elif kind == "shape":
      d_color, d_shape = _pick(rng, D.COLOR_NAMES), _pick(rng, D.SHAPES, exclude=[shape])
    else:
      d_color, d_shape = _pick(rng, D.COLOR_NAMES, exclude=[color]), _pick(rng, D.SHAPES)
    objects.append((d_color, d_shape))
  for _ in range(count):
    objects.append((
        color if kind != "shape" else _pick(rng, D.COLOR_NAMES),
        shape if kind != "color" else _pick(rng, D.SHAPES)))
  cells = D.sample_cells(rng, len(objects))
  image = _scene(rng, size, [(c, s, cell) for (c, s), cell in zip(objects, cells)])
  if kind == "color_shape":
    question = f"How many {color} {D.PLURALS[shape]} are there?"
  elif kind == "shape":
    question = f"How many {D.PLURALS[shape]} are there?"
  else:
    question = f"How many {color} objects are there?"
  return Example(np.asarray(image), question, str(count), template=kind)


# ----------------------------------------------------------------------------- general


@register("general")
def general(rng: np.random.Generator, size: int) -> Example:
  """One large shape on a coloured background: name the shape, its colour, or the background."""
  shapes = D.SHAPES + D.EXTRA_SHAPES
  shape = _pick(rng, shapes)
  color, background = _pick_many(rng, D.COLOR_NAMES, 2)
  image = Image.new("RGB", (size, size), D.COLORS[background])
  center = size / 2 + rng.uniform(-0.08, 0.08, size=2) * size
  D.draw_shape(ImageDraw.Draw(image), shape, tuple(center), 0.32 * size, D.COLORS[color])
  kind = ("shape", "color", "background")[int(rng.integers(3))]
  question, answer = {
      "shape": ("What shape is this?", shape),
      "color": ("What color is the shape?", color),
      "background": ("What color is the background?", background),
  }[kind]
  return Example(np.asarray(image), question, answer, template=kind)
