"""Grain input pipelines: schema records -> SFT batches or RFT/eval prompt batches.

    source (TFDS data source per task) -> multi-task union -> per-host even split -> seeded
    shuffle -> repeat -> [replay mixing, per example] -> image preprocessing + chat-template
    tokenisation (in `num_workers` processes) -> bad-example policy -> batch + pad to a length
    bucket -> [replay mixing, per batch] -> M-RoPE positions / vision inputs (with a model config)

Products (all numpy; see the brief's batch contract):
  SFT batch:    input_ids, attention_mask, loss_mask [B, S] int32 (right-padded), pixel_values
                [P, D] float32, image_grid_thw [I, 3] int32, task, id [B] str; with a model
                config also position_ids [3, B, S] int32 and vision_inputs (dict).
  prompt batch: prompt_ids, prompt_mask [B, Sp] int32 (LEFT-padded), pixel_values, image_grid_thw,
                answer, task, id [B] str; with a model config also position_ids, rope_deltas
                [B, 1] and vision_inputs.

Each `<|image_pad|>` of the chat template is expanded to t*h*w / merge**2 pads. Shapes are static
when `fixed_size` is set (P = images * patches) and sequences are padded to `length_buckets`.
Iterators are grain `DatasetIterator`s: `get_state` / `set_state` resume exactly (orbax saves
them with grain's checkpoint handler), including the bad-example counts.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
from absl import logging
import grain
import numpy as np
from PIL import Image

from cpt_jax.data import image_processing
from cpt_jax.data import prompts
from cpt_jax.data import tokenizer as tokenizer_lib

PRODUCTS = ("sft", "prompt")
BAD_EXAMPLE_POLICIES = ("skip", "raise")
REPLAY_UNITS = ("example", "batch")
REQUIRED_FIELDS = ("id", "task", "image", "question", "options", "answer")


class BadExampleError(ValueError):
  """Raised (with on_bad_example='raise') for a record that cannot become an example."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Pipeline settings (one per product and split).

  Attributes:
    product: "sft" (training sequences with a loss mask) or "prompt" (RFT rollouts, evaluation).
    prompt_style: `prompts.STYLES`; SFT batches need "sft" (the target is the bare answer).
    batch_size: examples per batch on this host.
    max_len: longest sequence kept (SFT: prompt + answer; prompt: prompt only), in tokens.
    length_buckets: pad each batch to the smallest bucket >= its longest row; empty -> max_len.
    seed: shuffling (and replay subset) seed; the same on every host.
    shuffle, num_epochs (None: repeat forever), drop_remainder: usual meanings.
    min_pixels, max_pixels: smart-resize bounds; fixed_size (H, W) resizes every image to one
      size instead, for static shapes under jit.
    patch_size, temporal_patch_size, merge_size: vision tower geometry.
    num_workers: processes for preprocessing (0: in this process); read_threads and
      prefetch_buffer: threads and buffer of each reader.
    on_bad_example: "skip" (count it in `iterator.counts`) or "raise" (BadExampleError naming
      the record id and file) for corrupt/missing images, missing fields, over-long examples.
    replay_fraction: share of examples (or batches) drawn from the replay tasks.
    replay_unit: "example" (mixed inside batches) or "batch" (whole batches from replay).
    replay_examples_per_task: keep only a seeded random subset of this size of each replay task
      (a finite replay buffer); None keeps all.
    shard_index, shard_count: this host's share of the data; None -> this JAX process.
  """
  product: str = "sft"
  prompt_style: str = "sft"
  batch_size: int = 8
  max_len: int = 1024
  length_buckets: tuple[int, ...] = ()
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = 1
  drop_remainder: bool = True
  min_pixels: int = image_processing.MIN_PIXELS
  max_pixels: int = image_processing.MAX_PIXELS
  fixed_size: tuple[int, int] | None = None
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  num_workers: int = 0
  read_threads: int = 1
  prefetch_buffer: int = 16
  on_bad_example: str = "skip"
  replay_fraction: float = 0.0
  replay_unit: str = "example"
  replay_examples_per_task: int | None = None
  shard_index: int | None = None
  shard_count: int | None = None

  def __post_init__(self):
    if self.product not in PRODUCTS:
      raise ValueError(f"product must be one of {PRODUCTS}, got {self.product!r}")
    if self.prompt_style not in prompts.STYLES:
      raise ValueError(f"prompt_style must be one of {prompts.STYLES}, got {self.prompt_style!r}")
    if self.product == "sft" and self.prompt_style != "sft":
      raise ValueError(f"SFT batches train on the bare answer; prompt_style must be 'sft', got "
                       f"{self.prompt_style!r}")
    if self.on_bad_example not in BAD_EXAMPLE_POLICIES:
      raise ValueError(f"on_bad_example must be one of {BAD_EXAMPLE_POLICIES}, got "
                       f"{self.on_bad_example!r}")
    if self.replay_unit not in REPLAY_UNITS:
      raise ValueError(f"replay_unit must be one of {REPLAY_UNITS}, got {self.replay_unit!r}")
    if not 0.0 <= self.replay_fraction < 1.0:
      raise ValueError(f"replay_fraction must be in [0, 1), got {self.replay_fraction}")
    if self.batch_size <= 0 or self.max_len <= 0:
      raise ValueError(f"batch_size and max_len must be positive, got {self.batch_size}, "
                       f"{self.max_len}")
    if any(b <= 0 or b > self.max_len for b in self.length_buckets):
      raise ValueError(f"length_buckets must be in [1, max_len={self.max_len}], got "
                       f"{self.length_buckets}")
    factor = self.patch_size * self.merge_size
    if self.fixed_size is not None and (
        len(self.fixed_size) != 2 or any(s <= 0 or s % factor for s in self.fixed_size)):
      raise ValueError(f"fixed_size must be (H, W), positive multiples of patch_size * merge_size "
                       f"= {factor}, got {self.fixed_size}")
    if (self.shard_index is None) != (self.shard_count is None):
      raise ValueError("set both shard_index and shard_count, or neither")

  @property
  def buckets(self) -> tuple[int, ...]:
    return tuple(sorted(set(self.length_buckets) | {self.max_len}))

  @property
  def patch_dim(self) -> int:
    return 3 * self.temporal_patch_size * self.patch_size**2


@dataclasses.dataclass(frozen=True)
class TaskSource:
  """A random-access source of schema records; `origin` names its file(s) in error messages."""
  task: str
  source: Any
  origin: str = ""


def open_sources(
    data_dir: str | os.PathLike, tasks: Sequence[str], split: str, kind: str = "real",
) -> list[TaskSource]:
  """Sources of built TFDS splits: kind "real" (`builders`) or "synthetic" (`synthetic`)."""
  if kind == "real":
    from cpt_jax.data import builders as loader  # pylint: disable=g-import-not-at-top
  elif kind == "synthetic":
    from cpt_jax.data import synthetic as loader  # pylint: disable=g-import-not-at-top
  else:
    raise ValueError(f"kind must be 'real' or 'synthetic', got {kind!r}")
  return [TaskSource(task, loader.load_split(data_dir, task, split)) for task in tasks]


def _record_file(source: Any, index: int, origin: str) -> str:
  """The file holding record `index` of a TFDS data source, else `origin` or the source repr."""
  info, split = getattr(source, "dataset_info", None), getattr(source, "split", None)
  if info is not None and split is not None:
    offset = 0
    for instruction in info.splits[split].file_instructions:
      if index < offset + instruction.take:
        return f"{instruction.filename} (record {instruction.skip + index - offset})"
      offset += instruction.take
  return f"{origin or repr(source)} (record {index})"


# ----------------------------------------------------------------------------- per example


@dataclasses.dataclass(frozen=True)
class _Bad:
  """Marker that replaces an example that could not be made."""
  reason: str
  task: str
  message: str


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _decode_image(value: Any) -> Image.Image | np.ndarray:
  if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 3:
    return value
  if isinstance(value, np.ndarray) and value.dtype == object:
    value = value.item()
  if not isinstance(value, bytes) or not value:
    raise ValueError("image is missing or empty")
  img = Image.open(io.BytesIO(value))
  img.load()
  return img


class _ImagePadMismatch(ValueError):
  """The rendered prompt's <|image_pad|> count differs from the number of images."""


class _Subset:
  """A fixed subset of a random-access source, the same in every epoch (a replay buffer)."""

  def __init__(self, source: Any, indices: np.ndarray):
    self.source = source
    self.indices = indices

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Any:
    return self.source[int(self.indices[index])]


class _Tag:
  """(index, record) -> record with where it came from, for error messages."""

  def __init__(self, task_source: TaskSource, indices: np.ndarray | None = None):
    self.task_source = task_source
    self.indices = indices  # Original record indices when reading a `_Subset`.
    self.length = len(task_source.source) if indices is None else len(indices)

  def __call__(self, index: int, record: Mapping[str, Any]) -> dict:
    index %= self.length  # Grain passes indices past the end in later epochs.
    if self.indices is not None:
      index = int(self.indices[index])
    return {"record": record, "index": index, "task_source": self.task_source}


class _ExampleMaker:
  """Tagged record -> tokenised example dict, or a `_Bad` marker (never raises on bad data)."""

  def __init__(self, tokenizer, config: DataConfig):
    self.tokenizer = tokenizer
    self.config = config
    self.image_pad_id = tokenizer.convert_tokens_to_ids(tokenizer_lib.IMAGE_PAD)
    self.im_end = tokenizer.eos_token  # "<|im_end|>" closes every turn.

  def __call__(self, tagged: dict) -> dict | _Bad:
    record, ts = tagged["record"], tagged["task_source"]
    where = _record_file(ts.source, tagged["index"], ts.origin)
    record_id = _text(record["id"]) if "id" in record else "?"
    missing = [f for f in REQUIRED_FIELDS if f not in record]
    if missing:
      return _Bad("missing_field", ts.task,
                  f"record id={record_id!r} in {where}: missing fields {missing}")
    task = _text(record["task"])
    try:
      fmt = prompts.get_prompt(task)
    except ValueError as e:
      return _Bad("unknown_task", task, f"record id={record_id!r} in {where}: {e}")
    image_pixels = np.zeros((0, self.config.patch_dim), np.float32)  # [P, D]
    grids = np.zeros((0, 3), np.int32)  # [I, 3]
    if fmt.has_image:
      try:
        image = _decode_image(record["image"])
        image_pixels, grid = image_processing.preprocess_image(
            image, min_pixels=self.config.min_pixels, max_pixels=self.config.max_pixels,
            patch_size=self.config.patch_size, temporal_patch_size=self.config.temporal_patch_size,
            merge_size=self.config.merge_size, fixed_size=self.config.fixed_size)
      except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError.
        return _Bad("bad_image", task, f"record id={record_id!r} in {where}: bad image: {e}")
      grids = grid.astype(np.int32)[None]
    question = _text(record["question"])
    options = [_text(o) for o in record["options"]]
    answer = _text(record["answer"])
    messages = prompts.build_messages(task, question, options, self.config.prompt_style)
    try:
      out = self._tokenize(messages, answer, grids)
    except _ImagePadMismatch as e:  # e.g. a question that contains the text "<|image_pad|>"
      return _Bad("bad_text", task, f"record id={record_id!r} in {where}: {e}")
    length = len(out["prompt_ids"] if self.config.product == "prompt" else out["input_ids"])
    if length > self.config.max_len:
      return _Bad("too_long", task, f"record id={record_id!r} in {where}: {length} tokens > "
                                    f"max_len={self.config.max_len}")
    out.update({"pixel_values": image_pixels, "image_grid_thw": grids,
                "task": task, "id": record_id, "answer": answer})
    return out

  def _tokenize(self, messages: list[dict], answer: str, grids: np.ndarray) -> dict:
    prompt_text = self.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = self._tokens(prompt_text, grids)
    if self.config.product == "prompt":
      return {"prompt_ids": prompt_ids}
    # The answer turn as the template renders it, split after its closing <|im_end|>: the
    # supervised part (answer + <|im_end|>) and the template's trailing text (not trained on).
    full = self.tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt_text):
      raise ValueError("the tokenizer's chat template does not render the generation prompt as a "
                       "prefix of the conversation; cannot locate the answer tokens")
    completion = full[len(prompt_text):]
    end = completion.index(self.im_end) + len(self.im_end)
    no_images = grids[:0]
    target_ids = self._tokens(completion[:end], no_images)
    tail_ids = self._tokens(completion[end:], no_images)
    return {
        "input_ids": np.concatenate([prompt_ids, target_ids, tail_ids]),
        "loss_mask": np.concatenate([np.zeros_like(prompt_ids), np.ones_like(target_ids),
                                     np.zeros_like(tail_ids)]),
    }

  def _tokens(self, text: str, grids: np.ndarray) -> np.ndarray:
    """Token ids of `text` with the i-th `<|image_pad|>` repeated for image i's merged patches."""
    ids = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
    is_pad = ids == self.image_pad_id
    if is_pad.sum() != len(grids):
      raise _ImagePadMismatch(f"text has {int(is_pad.sum())} image pads but {len(grids)} images")
    repeats = np.ones_like(ids)
    repeats[is_pad] = grids.prod(axis=-1) // self.config.merge_size**2
    return np.repeat(ids, repeats)


# ----------------------------------------------------------------------------- bad examples


class BadExampleCounts:
  """Examples kept and skipped (by reason and task) since the iterator started."""

  def __init__(self):
    self.kept = 0
    self.skipped: collections.Counter[str] = collections.Counter()  # "reason/task" -> count

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def state(self) -> dict:
    return {"kept": self.kept, "skipped": dict(self.skipped)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.kept = int(state["kept"])
    self.skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})


class _BadExamplePolicy:
  """Filter predicate: keeps good examples; raises on bad ones or counts and drops them."""

  def __init__(self, policy: str, counts: BadExampleCounts):
    self.policy = policy
    self.counts = counts

  def __call__(self, example: dict | _Bad) -> bool:
    if not isinstance(example, _Bad):
      self.counts.kept += 1
      return True
    if self.policy == "raise":
      raise BadExampleError(f"{example.reason}: {example.message}")
    self.counts.skipped[f"{example.reason}/{example.task}"] += 1
    logging.log_every_n_seconds(logging.WARNING, "skipping bad example: %s", 10, example.message)
    return False


# ----------------------------------------------------------------------------- batching


def _pad_rows(rows: Sequence[np.ndarray], length: int, value: int, left: bool) -> np.ndarray:
  out = np.full((len(rows), length), value, np.int32)
  for i, row in enumerate(rows):
    if left:
      out[i, length - len(row):] = row
    else:
      out[i, :len(row)] = row
  return out


class _Collate:
  """List of examples -> one batch, padded to the smallest length bucket that fits."""

  def __init__(self, config: DataConfig, pad_id: int):
    self.config = config
    self.pad_id = pad_id

  def __call__(self, examples: Sequence[dict]) -> dict[str, np.ndarray]:
    key = "input_ids" if self.config.product == "sft" else "prompt_ids"
    longest = max(len(e[key]) for e in examples)
    length = next(b for b in self.config.buckets if b >= longest)
    ids = [e[key] for e in examples]
    batch = {
        "pixel_values": np.concatenate([e["pixel_values"] for e in examples]).astype(np.float32),
        "image_grid_thw": np.concatenate([e["image_grid_thw"] for e in examples]).astype(np.int32),
        "task": np.array([e["task"] for e in examples]),
        "id": np.array([e["id"] for e in examples]),
    }
    if self.config.product == "sft":
      batch["input_ids"] = _pad_rows(ids, length, self.pad_id, left=False)  # [B, S]
      batch["attention_mask"] = _pad_rows([np.ones_like(i) for i in ids], length, 0, left=False)
      batch["loss_mask"] = _pad_rows([e["loss_mask"] for e in examples], length, 0, left=False)
    else:
      batch["prompt_ids"] = _pad_rows(ids, length, self.pad_id, left=True)  # [B, Sp]
      batch["prompt_mask"] = _pad_rows([np.ones_like(i) for i in ids], length, 0, left=True)
      batch["answer"] = np.array([e["answer"] for e in examples])
    return batch


class _ModelInputs:
  """Adds M-RoPE position ids and vision-tower metadata, computed on host by the model package."""

  def __init__(self, model_config: Any, product: str):
    self.model_config = model_config
    self.product = product

  def __call__(self, batch: dict) -> dict:
    from cpt_jax.models.qwen2_5_vl import model as model_lib  # pylint: disable=g-import-not-at-top

    if self.product == "sft":
      ids, mask = batch["input_ids"], batch["attention_mask"]
    else:
      ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    inputs = model_lib.prepare_inputs(self.model_config, ids, mask, batch["image_grid_thw"])
    batch["position_ids"] = inputs["position_ids"].astype(np.int32)
    batch["vision_inputs"] = inputs["vision_inputs"]
    if self.product == "prompt":
      batch["rope_deltas"] = inputs["rope_deltas"]
    return batch


# ----------------------------------------------------------------------------- pipeline


class DataIterator(grain.DatasetIterator):
  """Batch iterator; `counts` reports kept/skipped examples and is part of the saved state."""

  def __init__(self, parent: grain.DatasetIterator, counts: BadExampleCounts):
    super().__init__(parent)
    self.counts = counts

  def __next__(self) -> dict:
    return next(self._parent)

  def get_state(self) -> dict:
    return {"pipeline": self._parent.get_state(), "bad_examples": self.counts.state()}

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["pipeline"])
    self.counts.set_state(state["bad_examples"])


def _host_range(num_examples: int, options: grain.sharding.ShardOptions) -> slice:
  """Contiguous share of one host: equal sizes with drop_remainder, else sizes differ by <= 1."""
  per_host, remainder = divmod(num_examples, options.shard_count)
  if options.drop_remainder:
    remainder = 0
  start = options.shard_index * per_host + min(options.shard_index, remainder)
  return slice(start, start + per_host + (options.shard_index < remainder))


def _check_model_config(model_config: Any, tokenizer, config: DataConfig) -> None:
  """The model must know the tokenizer's image pad id and cut images like the pipeline."""
  pad_id = tokenizer.convert_tokens_to_ids(tokenizer_lib.IMAGE_PAD)
  errors = []
  if model_config.image_token_id != pad_id:
    errors.append(f"model image_token_id {model_config.image_token_id} != tokenizer "
                  f"{tokenizer_lib.IMAGE_PAD} id {pad_id}")
  vision = model_config.vision
  if vision is not None:
    for ours, theirs in (("patch_size", "patch_size"),
                         ("temporal_patch_size", "temporal_patch_size"),
                         ("merge_size", "spatial_merge_size")):
      if getattr(config, ours) != getattr(vision, theirs):
        errors.append(f"data {ours}={getattr(config, ours)} != model vision "
                      f"{theirs}={getattr(vision, theirs)}")
  if errors:
    raise ValueError("model config does not match the data pipeline: " + "; ".join(errors))


class Pipeline:
  """Iterable of batches from `sources` (a multi-task union), optionally mixed with `replay`.

  Every `iter(pipeline)` starts from the beginning with fresh counts; restore a position with
  `iterator.set_state(saved)`.
  """

  def __init__(
      self,
      sources: Sequence[TaskSource],
      tokenizer,
      config: DataConfig,
      *,
      replay: Sequence[TaskSource] = (),
      model_config: Any = None,
  ):
    if not sources:
      raise ValueError("Pipeline needs at least one task source")
    if config.replay_fraction > 0 and not replay:
      raise ValueError(f"replay_fraction={config.replay_fraction} but no replay sources given")
    if model_config is not None:
      _check_model_config(model_config, tokenizer, config)
    self.sources = list(sources)
    self.replay = list(replay) if config.replay_fraction > 0 else []
    self.tokenizer = tokenizer
    self.config = config
    self.model_config = model_config

  def __iter__(self) -> DataIterator:
    counts = BadExampleCounts()
    return DataIterator(iter(self._dataset(counts)), counts)

  def _shard_options(self) -> grain.sharding.ShardOptions:
    if self.config.shard_index is None:
      return grain.sharding.ShardByJaxProcess(drop_remainder=self.config.drop_remainder)
    return grain.sharding.ShardOptions(self.config.shard_index, self.config.shard_count,
                                       drop_remainder=self.config.drop_remainder)

  def _records(self, task_sources: Sequence[TaskSource], seed: int, num_epochs: int | None,
               subset: int | None = None) -> grain.MapDataset:
    """Tagged records of a union of tasks: this host's share, shuffled, repeated."""
    parts = []
    for ts in task_sources:
      if subset is None:
        parts.append(grain.MapDataset.source(ts.source).map_with_index(_Tag(ts)))
      else:
        rng = np.random.default_rng(seed + 1)
        indices = np.sort(rng.permutation(len(ts.source))[:subset])
        parts.append(grain.MapDataset.source(_Subset(ts.source, indices))
                     .map_with_index(_Tag(ts, indices)))
    ds = grain.MapDataset.concatenate(parts) if len(parts) > 1 else parts[0]
    ds = ds[_host_range(len(ds), self._shard_options())]
    if self.config.shuffle:
      ds = ds.shuffle(seed)
    return ds.repeat(num_epochs)

  def _examples(self, records: grain.MapDataset, counts: BadExampleCounts) -> grain.IterDataset:
    cfg = self.config
    ds = records.map(_ExampleMaker(self.tokenizer, cfg)).to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=cfg.prefetch_buffer))
    if cfg.num_workers > 0:
      # Grain's workers read absl flags; outside an absl app (notebooks, tests) they are still
      # unparsed, and marking them parsed gives every flag its default.
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=cfg.num_workers, per_worker_buffer_size=cfg.prefetch_buffer))
    # In this process, after the workers: counts stay consistent with the iterator state.
    return ds.filter(_BadExamplePolicy(cfg.on_bad_example, counts))

  def _batches(self, examples: grain.IterDataset) -> grain.IterDataset:
    return examples.batch(self.config.batch_size, drop_remainder=self.config.drop_remainder,
                          batch_fn=_Collate(self.config, self.tokenizer.pad_token_id))

  def _dataset(self, counts: BadExampleCounts) -> grain.IterDataset:
    cfg = self.config
    current = self._records(self.sources, cfg.seed, cfg.num_epochs)
    if not self.replay:
      ds = self._batches(self._examples(current, counts))
    else:
      # Replay repeats forever; the current tasks' epochs end the mixture.
      replay = self._records(self.replay, cfg.seed + 1, None, cfg.replay_examples_per_task)
      weights = [1.0 - cfg.replay_fraction, cfg.replay_fraction]
      if cfg.replay_unit == "example":
        ds = self._batches(self._examples(grain.MapDataset.mix([current, replay], weights), counts))
      else:
        ds = grain.IterDataset.mix([self._batches(self._examples(current, counts)),
                                    self._batches(self._examples(replay, counts))], weights)
    if self.model_config is not None:
      ds = ds.map(_ModelInputs(self.model_config, cfg.product))
    return ds
