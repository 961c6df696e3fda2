"""Drawing primitives for the synthetic tasks: palette, shapes on a grid, bitmap text, textures.

Everything is drawn without anti-aliasing, so every object is made of exact palette colours
and tests can re-derive answers from pixels. Sizes are in units of `image_size / 56`, so a
scene looks the same at 56, 84 or 112 pixels.
"""
from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Object colours. Backgrounds are neutral grays, which no palette colour equals.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (240, 130, 20),
}
COLOR_NAMES = tuple(COLORS)
# Shapes used in scenes: distinguishable at radius 5 px.
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# Larger single-object drawings (the `general` task) can also show these.
EXTRA_SHAPES = ("diamond", "cross", "star")
# Text of labels and signs; figure lines use a dark gray so labels stay separable.
TEXT_BLACK = (0, 0, 0)
TEXT_WHITE = (255, 255, 255)
LINE_GRAY = (90, 90, 90)
# A "thumb over the lens" occluder (vizwiz); brown, unlike any palette colour or gray.
OCCLUDER = (110, 80, 60)
# Full-image textures (pathvqa).
PATTERNS = ("stripes", "dots", "checks", "grid")

GRID = 4  # Scenes place objects in the cells of a GRID x GRID layout.


def unit(size: int) -> float:
  """Pixels per design unit (designs are drawn for 56-pixel images)."""
  return size / 56


def gray_background(rng: np.random.Generator, size: int) -> Image.Image:
  level = int(rng.integers(200, 251))
  return Image.new("RGB", (size, size), (level, level, level))


def draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    center: tuple[float, float],
    radius: float,
    color: tuple[int, int, int],
) -> None:
  """Draws a filled `shape` that fits in the square of half-side `radius` around `center`."""
  cx, cy = center
  r = radius
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
  elif shape == "square":
    h = 0.85 * r
    draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=color)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=color)
  elif shape == "diamond":
    draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)
  elif shape == "cross":
    w = 0.35 * r
    draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
    draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
  elif shape == "star":
    angles = -np.pi / 2 + np.arange(10) * np.pi / 5  # 5 outer and 5 inner points
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=color)
  else:
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES + EXTRA_SHAPES}")


def cell_size(size: int, grid: int = GRID) -> float:
  return size / grid


def cell_center(
    rng: np.random.Generator, cell: tuple[int, int], size: int, grid: int = GRID
) -> tuple[float, float]:
  """Center of grid cell (row, col), jittered by up to 7% of a cell."""
  c = cell_size(size, grid)
  jitter = rng.uniform(-0.07, 0.07, size=2) * c
  row, col = cell
  return ((col + 0.5) * c + jitter[0], (row + 0.5) * c + jitter[1])


def object_radius(size: int, grid: int = GRID) -> float:
  # Radius + jitter stays below half a cell: objects never touch each other or a cell edge.
  return 0.36 * cell_size(size, grid)


def sample_cells(rng: np.random.Generator, n: int, grid: int = GRID) -> list[tuple[int, int]]:
  """n distinct (row, col) cells."""
  flat = rng.choice(grid * grid, size=n, replace=False)
  return [(int(i) // grid, int(i) % grid) for i in flat]


def draw_scene(
    image: Image.Image,
    rng: np.random.Generator,
    objects: list[tuple[str, str, tuple[int, int]]],
    grid: int = GRID,
) -> None:
  """Draws (color, shape, cell) objects at jittered cell centers."""
  draw = ImageDraw.Draw(image)
  radius = object_radius(image.width, grid)
  for color, shape, cell in objects:
    draw_shape(draw, shape, cell_center(rng, cell, image.width, grid), radius, COLORS[color])


def cover_cell(image: Image.Image, cell: tuple[int, int], grid: int = GRID) -> None:
  """Paints the whole cell with the occluder colour (hides whatever object it holds)."""
  c = cell_size(image.width, grid)
  row, col = cell
  box = [round(col * c), round(row * c), round((col + 1) * c) - 1, round((row + 1) * c) - 1]
  ImageDraw.Draw(image).rounded_rectangle(box, radius=c / 4, fill=OCCLUDER)


@functools.cache
def _font() -> ImageFont.ImageFont:
  return ImageFont.load_default_imagefont()  # PIL's built-in 6x11 bitmap font


@functools.lru_cache(maxsize=4096)
def text_mask(text: str, scale: int = 1) -> np.ndarray:
  """Read-only bool mask [11*scale, 6*len*scale] of `text` in PIL's bitmap font, upscaled."""
  font = _font()
  _, _, width, height = font.getbbox(text)
  canvas = Image.new("L", (width, height), 0)
  ImageDraw.Draw(canvas).text((0, 0), text, fill=255, font=font)
  mask = np.kron(np.asarray(canvas) > 0, np.ones((scale, scale), dtype=bool))
  mask.flags.writeable = False  # shared by the cache
  return mask


def text_scale(size: int) -> int:
  return max(1, size // 56)


def paste_text(
    pixels: np.ndarray, text: str, top_left: tuple[int, int], color: tuple[int, int, int],
    scale: int = 1,
) -> tuple[int, int]:
  """Writes `text` into pixels [H, W, 3] at (x, y); returns the (width, height) it covers."""
  mask = text_mask(text, scale)
  x, y = top_left
  h, w = mask.shape
  if x < 0 or y < 0 or y + h > pixels.shape[0] or x + w > pixels.shape[1]:
    raise ValueError(f"text {text!r} of size {(w, h)} at {(x, y)} leaves image {pixels.shape}")
  pixels[y:y + h, x:x + w][mask] = color
  return w, h


def texture(
    rng: np.random.Generator, pattern: str, size: int,
) -> np.ndarray:
  """A full-image two-colour texture [size, size, 3] uint8, in stain-like pink and purple."""
  u = unit(size)
  period = int(round(rng.integers(8, 15) * u))
  phase_x, phase_y = rng.integers(0, period, size=2)
  yy, xx = np.mgrid[0:size, 0:size]
  xx, yy = xx + phase_x, yy + phase_y
  if pattern == "stripes":
    coord = xx if rng.random() < 0.5 else yy
    fg = (coord % period) < period // 2
  elif pattern == "checks":
    half = max(period // 2, 2)
    fg = ((xx // half) + (yy // half)) % 2 == 0
  elif pattern == "dots":
    radius = period * rng.uniform(0.2, 0.3)
    dx, dy = xx % period - period / 2, yy % period - period / 2
    fg = dx * dx + dy * dy <= radius * radius
  elif pattern == "grid":
    width = max(1, int(round(u * rng.integers(1, 3))))
    fg = ((xx % period) < width) | ((yy % period) < width)
  else:
    raise ValueError(f"unknown pattern {pattern!r}; known: {PATTERNS}")
  background = np.array([rng.integers(225, 250), rng.integers(170, 205), rng.integers(195, 225)])
  foreground = np.array([rng.integers(100, 150), rng.integers(40, 80), rng.integers(130, 180)])
  return np.where(fg[..., None], foreground, background).astype(np.uint8)

