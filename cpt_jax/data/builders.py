"""TFDS builders that turn a user's local copy of each task into array_record files.

There is no download: the user puts the task's files in a directory (TFDS's "manual dir") and
`build(task, manual_dir, data_dir)` writes `data_dir/cpt_<task>/1.0.0/*.array_record*` with the
uniform schema of `cpt_jax.data.schema`. Two input formats are read, per split:

(a) LLaVA/CoIN JSON: `<split>.json` (a list) or `<split>.jsonl` of
      {"id", "image": "relative/path.jpg", "conversations": [{"from": "human", "value":
       "<image>\\nQuestion ...\\nA. x\\nB. y\\nAnswer with ..."}, {"from": "gpt", "value": "A"}]}
    Image paths are relative to `image_dir` (default: the manual dir). Known instruction
    sentences and "<image>" are stripped from the question (prompts are rebuilt at training time
    by `cpt_jax.data.prompts`); trailing "A. ..." lines become `options`. A conversation with k
    question/answer pairs gives k examples with ids "<id>#<k>".
(b) Parquet shards as published on model hubs: any `*.parquet` under the manual dir; the split
    is the file-name prefix ("test-00000-of-00002.parquet" -> test) or else the parent folder.
    Columns are found through the per-task `COLUMN_MAPS` table (first listed column present
    wins); images are {"bytes", "path"} structs, raw bytes, paths, or lists of those (the first
    is used).

Text-only MMLU-Pro: the schema requires an image, so its examples store a black 28x28 RGB
placeholder (`blank_image()`); its prompt format has `has_image=False`, so the pipeline never
gives that image to the model.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import io
import json
import os
import re
import string
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from cpt_jax.data import prompts
from cpt_jax.data import schema

BLANK_IMAGE_SIZE = 28
BAD_EXAMPLE_POLICIES = ("raise", "skip")


class BadExampleError(ValueError):
  """A record that cannot become a valid example (names the record and its file)."""


@dataclasses.dataclass(frozen=True)
class ColumnMap:
  """Parquet columns of one task; for each field, candidate column names in order of preference.

  Attributes:
    context: optional text shown as a "Context: ..." line after the question (ScienceQA hint).
    drop_rows_without_image: rows whose image is null are not part of the task (ScienceQA's
      image subset) and are dropped without counting as bad.
  """
  id: tuple[str, ...] = ("id", "question_id")
  image: tuple[str, ...] = ("image",)
  question: tuple[str, ...] = ("question",)
  answer: tuple[str, ...] = ("answer",)
  options: tuple[str, ...] = ("choices", "options")
  context: tuple[str, ...] = ()
  drop_rows_without_image: bool = False


# Column layouts of the public hub copies (e.g. derek-thomas/ScienceQA, lmms-lab/textvqa,
# lmms-lab/VizWiz-VQA, lmms-lab/GQA, hiyouga/geometry3k, flaviagiammarino/path-vqa,
# MMMU/MMMU, TIGER-Lab/MMLU-Pro, lmms-lab/POPE); extra candidates cover close variants.
COLUMN_MAPS: dict[str, ColumnMap] = {
    "scienceqa": ColumnMap(context=("hint",), drop_rows_without_image=True),
    "textvqa": ColumnMap(id=("question_id", "id"), answer=("answers", "answer")),
    "vizwiz": ColumnMap(id=("question_id", "id"), answer=("answers", "answer")),
    "gqa": ColumnMap(id=("question_id", "id"), image=("image", "image_path")),
    "geometry3k": ColumnMap(image=("images", "image"), question=("problem", "question")),
    "pathvqa": ColumnMap(),
    "superclevr": ColumnMap(question=("question", "problem"), answer=("answer", "solution")),
    "mmmu": ColumnMap(image=("image_1", "image")),
    "mmlu_pro": ColumnMap(id=("question_id", "id"), image=()),
    "pope": ColumnMap(id=("question_id", "id")),
}


def builder_name(task: str) -> str:
  return f"cpt_{task}"


def blank_image() -> Image.Image:
  """Placeholder image of text-only examples."""
  return Image.new("RGB", (BLANK_IMAGE_SIZE, BLANK_IMAGE_SIZE))


# ----------------------------------------------------------------------------- value parsing


def _open_image(value: Any, base_dir: str) -> Image.Image:
  """Decodes an image given as {bytes, path}, bytes, a path, or a list of those (first used)."""
  if isinstance(value, (list, tuple, np.ndarray)):
    if len(value) == 0:
      raise ValueError("image list is empty")
    value = value[0]
  if isinstance(value, dict):
    value = value.get("bytes") or value.get("path")
  if value is None or (isinstance(value, (str, bytes)) and not value):
    raise ValueError("image is missing")
  if isinstance(value, bytes):
    img = Image.open(io.BytesIO(value))
  else:
    path = os.path.join(base_dir, value)
    if not os.path.isfile(path):
      raise ValueError(f"image file not found: {path}")
    img = Image.open(path)
  img.load()  # Decode now, so that truncated files fail here.
  return img if img.mode == "RGB" else img.convert("RGB")


def _to_text_list(value: Any) -> list[str]:
  """Options as a list of strings; accepts lists, arrays and Python-literal strings (MMMU)."""
  if value is None:
    return []
  if isinstance(value, str):
    value = value.strip()
    if not value:
      return []
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError) as e:
      raise ValueError(f"options string is not a list literal: {value[:80]!r}") from e
    if not isinstance(value, (list, tuple)):
      raise ValueError(f"options string is not a list literal: {value!r}")
  return [str(v).strip() for v in value]


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _answer_text(value: Any, options: Sequence[str]) -> str:
  """One ground-truth string: the majority of several annotator answers, an option index or
  option text turned into its letter, or the inside of <answer></answer> tags."""
  if isinstance(value, (list, tuple, np.ndarray)):
    answers = [str(a).strip() for a in value if a is not None and str(a).strip()]
    if not answers:
      raise ValueError("answer list is empty")
    # Most common answer; ties go to the first one listed.
    value = collections.Counter(answers).most_common(1)[0][0]
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    if not 0 <= value < len(options):
      raise ValueError(f"answer index {value} out of range for {len(options)} options")
    return string.ascii_uppercase[value]
  if value is None:
    raise ValueError("answer is missing")
  text = str(value)
  tagged = _ANSWER_TAG.findall(text)
  text = (tagged[-1] if tagged else text).strip()
  if options and text not in string.ascii_uppercase[: len(options)] and text in options:
    text = string.ascii_uppercase[options.index(text)]
  if not text:
    raise ValueError("answer is empty")
  return text


# ----------------------------------------------------------------------------- readers


@dataclasses.dataclass(frozen=True)
class _RawExample:
  key: str
  file: str
  task: str
  question: str
  options: list[str]
  answer: str
  image: Any  # Unparsed image value, decoded by the builder.
  image_dir: str


def _read_llava_json(
    path: str, task: str, image_dir: str,
) -> Iterator[_RawExample | BadExampleError]:
  with open(path) as f:
    if path.endswith(".jsonl"):
      entries = [json.loads(line) for line in f if line.strip()]
    else:
      entries = json.load(f)
  if not isinstance(entries, list):
    raise ValueError(f"{path}: expected a JSON list of examples, got {type(entries).__name__}")
  for n, entry in enumerate(entries):
    entry_id = str(entry.get("id", f"{os.path.basename(path)}:{n}"))
    turns = entry.get("conversations") or []
    pairs = [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)
             if turns[i].get("from") == "human" and turns[i + 1].get("from") == "gpt"]
    if not pairs:
      yield BadExampleError(f"record id={entry_id!r} in {path}: no human/gpt conversation pair")
      continue
    for k, (human, gpt) in enumerate(pairs):
      key = entry_id if len(pairs) == 1 else f"{entry_id}#{k}"
      question, options = prompts.split_options(prompts.strip_instructions(human.get("value", "")))
      try:
        answer = _answer_text(gpt.get("value"), options)
      except ValueError as e:
        yield BadExampleError(f"record id={key!r} in {path}: {e}")
        continue
      yield _RawExample(key, path, task, question, options, answer, entry.get("image"), image_dir)


def _first_present(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
  return next((c for c in candidates if c in columns), None)


def _read_parquet(path: str, task: str, base_dir: str) -> Iterator[_RawExample | BadExampleError]:
  import pyarrow.parquet as pq  # Only needed for this input format.

  cmap = COLUMN_MAPS[task]
  parquet = pq.ParquetFile(path)
  present = parquet.schema_arrow.names
  cols = {field: _first_present(present, getattr(cmap, field))
          for field in ("id", "image", "question", "answer", "options", "context")}
  needs_image = prompts.get_prompt(task).has_image
  missing = [f for f in ("question", "answer") + (("image",) if needs_image else ()) if not cols[f]]
  if missing:
    raise ValueError(
        f"{path}: no column for {missing} of task {task!r}; looked for "
        f"{ {f: getattr(cmap, f) for f in missing} }, file has {present}")
  row_offset = 0
  for batch in parquet.iter_batches(batch_size=256, columns=[c for c in cols.values() if c]):
    for i, row in enumerate(batch.to_pylist()):
      key = (str(row[cols["id"]]) if cols["id"] and row[cols["id"]] is not None
             else f"{os.path.basename(path)}:{row_offset + i}")
      image = row[cols["image"]] if cols["image"] else None
      if needs_image and cmap.drop_rows_without_image and not _has_image(image):
        continue
      question = prompts.strip_instructions(str(row[cols["question"]] or ""))
      context = str(row[cols["context"]] or "").strip() if cols["context"] else ""
      if context:
        question = f"{question}\nContext: {context}"
      try:
        options = _to_text_list(row[cols["options"]]) if cols["options"] else []
        answer = _answer_text(row[cols["answer"]], options)
      except ValueError as e:
        yield BadExampleError(f"record id={key!r} in {path}: {e}")
        continue
      yield _RawExample(key, path, task, question, options, answer, image, base_dir)
    row_offset += batch.num_rows


def _has_image(value: Any) -> bool:
  if isinstance(value, dict):
    return bool(value.get("bytes") or value.get("path"))
  if isinstance(value, (list, tuple, np.ndarray)):
    return len(value) > 0
  return bool(value)


_SPLIT_FROM_FILE = re.compile(r"^([A-Za-z_]+?)(?:[-_.].*)?\.parquet$")


def _discover_splits(manual_dir: str) -> dict[str, list[tuple[str, str]]]:
  """{split: [(format, path), ...]} for the JSON files and parquet shards under manual_dir."""
  splits: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
  for name in sorted(os.listdir(manual_dir)):
    stem, ext = os.path.splitext(name)
    if ext in (".json", ".jsonl"):
      splits[stem].append(("llava_json", os.path.join(manual_dir, name)))
  for root, _, files in sorted(os.walk(manual_dir)):
    for name in sorted(files):
      if name.endswith(".parquet"):
        match = _SPLIT_FROM_FILE.match(name)
        split = match.group(1) if match else os.path.basename(root)
        splits[split].append(("parquet", os.path.join(root, name)))
  for split, files in splits.items():
    if len({fmt for fmt, _ in files}) > 1:
      raise ValueError(f"split {split!r} in {manual_dir} mixes JSON and parquet files: {files}")
  return dict(splits)


# ----------------------------------------------------------------------------- builders


class RealTaskBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base builder; `TASK` is set by each task's subclass (`cpt_<task>`)."""

  TASK: str = ""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Uniform schema from LLaVA/CoIN JSON or hub parquet files."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the task's files in the manual dir: <split>.json / <split>.jsonl in LLaVA/CoIN "
      "format with their images (paths relative to image_dir), or hub parquet shards "
      "(e.g. data/test-00000-of-00001.parquet).")

  # This builder downloads nothing, so it has no checksums file to find next to its code (TFDS's
  # lookup of that file also fails on editable installs).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    return None

  def __init__(self, *, on_bad_example: str = "raise", image_dir: str | None = None, **kwargs):
    if on_bad_example not in BAD_EXAMPLE_POLICIES:
      raise ValueError(f"on_bad_example must be one of {BAD_EXAMPLE_POLICIES}, got "
                       f"{on_bad_example!r}")
    self.on_bad_example = on_bad_example
    self.image_dir = image_dir
    # Messages of the records skipped while generating (on_bad_example='skip').
    self.skipped: list[str] = []
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.TASK} in the cpt_jax uniform schema, from local files.",
        features=schema.features(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    splits = _discover_splits(manual_dir)
    if not splits:
      raise ValueError(f"no <split>.json/.jsonl or *.parquet files for task {self.TASK!r} in "
                       f"{manual_dir}")
    return {split: self._generate_examples(files, manual_dir) for split, files in splits.items()}

  def _generate_examples(self, files: list[tuple[str, str]], manual_dir: str):
    image_dir = self.image_dir or manual_dir
    for fmt, path in files:
      if fmt == "llava_json":
        raw_examples = _read_llava_json(path, self.TASK, image_dir)
      else:
        raw_examples = _read_parquet(path, self.TASK, manual_dir)
      for raw in raw_examples:
        example = raw if isinstance(raw, BadExampleError) else self._encode(raw)
        if isinstance(example, BadExampleError):
          if self.on_bad_example == "raise":
            raise example
          logging.warning("skipping bad example: %s", example)
          self.skipped.append(str(example))
          continue
        yield example

  def _encode(self, raw: _RawExample) -> tuple[str, dict] | BadExampleError:
    if prompts.get_prompt(self.TASK).has_image:
      try:
        image = _open_image(raw.image, raw.image_dir)
      except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError.
        return BadExampleError(f"record id={raw.key!r} in {raw.file}: bad image: {e}")
    else:
      image = blank_image()
    return raw.key, {
        "id": raw.key, "task": raw.task, "image": image, "question": raw.question,
        "options": raw.options, "answer": raw.answer,
    }


# One registered TFDS builder per task, named cpt_<task> (module-level classes, so that data
# sources that reference them can be pickled into data-loading worker processes).
class CptScienceqa(RealTaskBuilder):
  TASK = "scienceqa"


class CptTextvqa(RealTaskBuilder):
  TASK = "textvqa"


class CptVizwiz(RealTaskBuilder):
  TASK = "vizwiz"


class CptGqa(RealTaskBuilder):
  TASK = "gqa"


class CptGeometry3k(RealTaskBuilder):
  TASK = "geometry3k"


class CptPathvqa(RealTaskBuilder):
  TASK = "pathvqa"


class CptSuperclevr(RealTaskBuilder):
  TASK = "superclevr"


class CptMmmu(RealTaskBuilder):
  TASK = "mmmu"


class CptMmluPro(RealTaskBuilder):
  TASK = "mmlu_pro"


class CptPope(RealTaskBuilder):
  TASK = "pope"


BUILDERS: dict[str, type[RealTaskBuilder]] = {
    cls.TASK: cls for cls in (CptScienceqa, CptTextvqa, CptVizwiz, CptGqa, CptGeometry3k,
                              CptPathvqa, CptSuperclevr, CptMmmu, CptMmluPro, CptPope)}


def _builder_class(task: str) -> type[RealTaskBuilder]:
  if task not in BUILDERS:
    raise ValueError(f"unknown task {task!r}; known: {sorted(BUILDERS)}")
  return BUILDERS[task]


def build(
    task: str,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    on_bad_example: str = "raise",
    image_dir: str | os.PathLike | None = None,
) -> RealTaskBuilder:
  """Writes `task`'s splits found in `manual_dir` as array_record under `data_dir`.

  Already-built versions are left as they are (TFDS semantics). With on_bad_example='skip',
  `builder.skipped` lists the records that were left out and why.
  """
  builder = _builder_class(task)(
      data_dir=os.fspath(data_dir), on_bad_example=on_bad_example,
      image_dir=os.fspath(image_dir) if image_dir is not None else None,
      file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir)))
  return builder


def load_split(data_dir: str | os.PathLike, task: str, split: str):
  """Random-access source of a built split; images stay PNG bytes (decoded by the pipeline)."""
  builder = _builder_class(task)(data_dir=os.fspath(data_dir), file_format="array_record")
  return builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
