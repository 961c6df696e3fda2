"""Rollouts for GRPO, host side (numpy): sample -> grade -> group -> filter -> training rows.

    groups = sample_groups(sampler, prompt_batch, key=key, cfg=cfg, tokenizer=tok)
    groups = add_advantages(groups, cfg)
    for step in minibatch_groups(num_groups, update_groups, micro_batches):
      for micro in step:  # whole groups per optimiser step, split for gradient accumulation
        batch = training_batch(take_rows(groups, micro, model_config), model_config)

A group batch has one row per prompt: the prompt batch (prompt_ids [B, Sp] left-padded,
prompt_mask, pixel_values [P, D], image_grid_thw [I, 3], answer, task, id [B]) plus its G = n
graded responses: tokens, policy_logprobs [B, G, N], lengths, done, reward, accuracy, format
[B, G], response (str) [B, G] and, after `add_advantages`, advantages [B, G]. Images are not
row-aligned ([P, D] patches of all images in reading order), so row selection goes through
`take_rows`, which moves each prompt's images with it. `training_batch` lays groups out for the
policy forward: each prompt (and its images) once, then one row per response (group-major).

RIF-RFT (papers.md, "RIF-RFT"): `offline_filter` grades n rollouts per training instance with
the current model before a task and keeps the learnable ones (`filtering.filter_instances`);
`collect_groups` with mode 'online' drops groups by mean accuracy inside each rollout batch and
refills from further batches (`filtering.filter_groups` + `GroupRefill`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import numpy as np

from cpt_jax.models.qwen2_5_vl.model import prepare_inputs
from cpt_jax.rl import filtering, grpo, rewards

Batch = dict[str, Any]

IMAGE_KEYS = ("pixel_values", "image_grid_thw")
# Host metadata of a specific row set; recomputed after rows are selected, never carried along.
DERIVED_KEYS = ("position_ids", "vision_inputs", "rope_deltas")
PROMPT_KEYS = ("prompt_ids", "prompt_mask", "answer", "task", "id") + IMAGE_KEYS


# ----------------------------------------------------------------------------- row selection

def _num_rows(batch: Batch) -> int:
  if "prompt_ids" not in batch:
    raise ValueError(f"expected a prompt or group batch with prompt_ids; keys: {sorted(batch)}")
  return len(batch["prompt_ids"])


def images_per_row(batch: Batch, model_config) -> list[np.ndarray]:
  """Indices (into image_grid_thw) of each prompt row's images, matched by counting image tokens."""
  ids = np.asarray(batch["prompt_ids"])
  grids = np.asarray(batch.get("image_grid_thw", np.zeros((0, 3), np.int32))).reshape(-1, 3)
  tokens_per_row = (ids == model_config.image_token_id).sum(axis=1)  # [B]
  merge = model_config.vision.spatial_merge_size if model_config.vision is not None else 1
  tokens_per_image = grids.prod(axis=1) // merge**2  # [I]
  rows, image = [], 0
  for b, need in enumerate(tokens_per_row):
    start = image
    while need > 0 and image < len(grids):
      need -= tokens_per_image[image]
      image += 1
    if need != 0:
      raise ValueError(f"row {b}: its image tokens do not match whole images of image_grid_thw "
                       f"{grids.tolist()} (images {start}..{image - 1})")
    rows.append(np.arange(start, image))
  if image != len(grids):
    raise ValueError(f"image_grid_thw has {len(grids)} images but the rows' image tokens cover "
                     f"{image}")
  return rows


def take_rows(batch: Batch, rows: Sequence[int] | np.ndarray, model_config) -> Batch:
  """The rows `rows` (repeats allowed, any order) of a prompt or group batch, with their images.

  Row-aligned arrays are indexed on their leading axis; pixel_values / image_grid_thw are
  gathered image by image; position_ids / vision_inputs / rope_deltas are dropped (they
  describe the old rows; `training_batch` or `prepare_inputs` recompute them).
  """
  rows = np.asarray(rows, np.int64)
  num_rows = _num_rows(batch)
  if rows.size and (rows.min() < 0 or rows.max() >= num_rows):
    raise ValueError(f"rows {rows.tolist()} out of range for a batch of {num_rows}")
  out = {k: np.asarray(v)[rows] for k, v in batch.items()
         if k not in IMAGE_KEYS + DERIVED_KEYS and v is not None}
  if "image_grid_thw" in batch:
    grids = np.asarray(batch["image_grid_thw"]).reshape(-1, 3)
    pixels = np.asarray(batch["pixel_values"])
    patch_start = np.concatenate([[0], np.cumsum(grids.prod(axis=1))])
    images = images_per_row(batch, model_config)
    picked = np.concatenate([images[r] for r in rows] or [np.zeros(0, np.int64)]).astype(np.int64)
    patch_index = np.concatenate(
        [np.arange(patch_start[i], patch_start[i + 1]) for i in picked] or [np.zeros(0, np.int64)])
    out["image_grid_thw"] = grids[picked].astype(np.int32)
    out["pixel_values"] = pixels[patch_index.astype(np.int64)]
  return out


def concat_groups(parts: Sequence[Batch], pad_id: int) -> Batch:
  """Concatenates group batches along rows; prompts are left-padded to the longest part."""
  if not parts:
    raise ValueError("concat_groups needs at least one batch")
  length = max(p["prompt_ids"].shape[1] for p in parts)

  def left_pad(x, value):
    return np.pad(x, ((0, 0), (length - x.shape[1], 0)), constant_values=value)

  out = {}
  for key in parts[0]:
    if key in DERIVED_KEYS:
      continue
    values = [p[key] for p in parts]
    if key == "prompt_ids":
      values = [left_pad(v, pad_id) for v in values]
    elif key == "prompt_mask":
      values = [left_pad(v, 0) for v in values]
    out[key] = np.concatenate(values, axis=0)
  return out


def pad_rows(batch: Batch, size: int, model_config) -> tuple[Batch, int]:
  """Pads a (last, partial) batch to `size` rows by repeating row 0: (batch, real rows)."""
  num = _num_rows(batch)
  if num > size:
    raise ValueError(f"batch has {num} rows > size {size}")
  if num == size:
    return batch, num
  return take_rows(batch, np.concatenate([np.arange(num), np.zeros(size - num, np.int64)]),
                   model_config), num


# ----------------------------------------------------------------------------- sampling, grading

def decode_responses(tokenizer, tokens: np.ndarray, lengths: np.ndarray,
                     done: np.ndarray) -> list[str]:
  """Response texts: each row's generated tokens without its final EOS and special tokens."""
  keep = lengths - done.astype(lengths.dtype)  # the EOS is the last counted token of done rows
  return tokenizer.batch_decode([row[:k].tolist() for row, k in zip(tokens, keep)],
                                skip_special_tokens=True)


def sample_groups(sampler, batch: Batch, *, key: jax.Array, cfg: grpo.GRPOConfig, tokenizer,
                  num_samples: int | None = None, temperature: float | None = None,
                  top_p: float | None = None, top_k: int | None = None) -> Batch:
  """n responses per prompt of a prompt batch, graded with `cfg.reward`; group layout.

  num_samples / temperature / top_p default to cfg.n / cfg.temperature / cfg.top_p.
  """
  n = cfg.n if num_samples is None else num_samples
  if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    # A raw key goes in as a host array: where a device key lives is part of the compiled
    # program, and keys folded from a sharded train state live elsewhere than fresh ones.
    key = np.asarray(key)
  out = sampler(batch["prompt_ids"], batch["prompt_mask"], key=key, num_samples=n,
                temperature=cfg.temperature if temperature is None else temperature,
                top_p=cfg.top_p if top_p is None else top_p, top_k=top_k,
                pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"))
  responses = decode_responses(tokenizer, out.tokens, out.lengths, out.done)
  scores = rewards.score_batch(responses, np.repeat(batch["answer"], n),
                               np.repeat(batch["task"], n), cfg.reward)
  b = len(batch["prompt_ids"])
  groups = {k: batch[k] for k in PROMPT_KEYS if k in batch}
  groups.update(
      tokens=out.tokens.reshape(b, n, -1), policy_logprobs=out.policy_logprobs.reshape(b, n, -1),
      lengths=out.lengths.reshape(b, n), done=out.done.reshape(b, n),
      response=np.asarray(responses, dtype=object).reshape(b, n),
      **{k: v.reshape(b, n) for k, v in scores.items()})
  return groups


def group_stats(groups: Batch) -> dict[str, float]:
  """Reward statistics of a group batch (the paper's theory: within-group reward variance)."""
  n = groups["reward"].shape[1]
  stats = {k: float(v) for k, v in grpo.group_metrics(groups["reward"], n).items()}
  stats["accuracy_mean"] = float(groups["accuracy"].mean())
  stats["format_mean"] = float(groups["format"].mean())
  stats["response_length"] = float(groups["lengths"].mean())
  stats["response_clipped_frac"] = float((~groups["done"]).mean())
  return stats


# ----------------------------------------------------------------------------- training rows

def add_advantages(groups: Batch, cfg: grpo.GRPOConfig,
                   baseline: np.ndarray | None = None) -> Batch:
  """groups + advantages [B, G] (cfg.advantage; baseline [B] = greedy reward, for 'remax')."""
  advantages = np.asarray(grpo.compute_advantages(groups["reward"], cfg, baseline), np.float32)
  return {**groups, "advantages": advantages}


def training_batch(groups: Batch, model_config, pad_id: int = 0) -> Batch:
  """Group layout -> the arrays the policy forward needs (numpy), each prompt ONCE.

  Returns prompt_ids, prompt_mask [B, Sp] and prompt_position_ids [3, B, Sp]; response_ids,
  response_mask (1 up to each length, EOS included), sampler_logprobs [R, N] and
  response_position_ids [3, R, N] for the R = B * G responses, group-major (row i * G + j is
  response j of prompt i); advantages [R] (if present); with images, each prompt's
  pixel_values and vision_inputs once. The forward (train.rft.response_logprobs) runs each
  prompt and its images once and lets its G responses read the prompt's keys and values.
  Response tokens that are image/video pads are positioned as text, as the sampler fed them.
  """
  b, n, new_tokens = groups["tokens"].shape
  prompt_ids = np.asarray(groups["prompt_ids"], np.int32)  # [B, Sp]
  prompt_mask = np.asarray(groups["prompt_mask"], np.int32)
  tokens = groups["tokens"].reshape(b * n, new_tokens).astype(np.int32)  # [R, N]
  response_mask = (np.arange(new_tokens)[None] < groups["lengths"].reshape(-1, 1)
                   ).astype(np.int32)
  out = {
      "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "response_ids": tokens,
      "response_mask": response_mask,
      "sampler_logprobs": groups["policy_logprobs"].reshape(b * n, new_tokens).astype(np.float32),
  }
  if "advantages" in groups:
    out["advantages"] = groups["advantages"].reshape(-1).astype(np.float32)
  # M-RoPE positions of whole rows (prompt, then response), split into the two parts.
  response = np.where(np.isin(tokens, [model_config.image_token_id, model_config.video_token_id]),
                      pad_id, tokens)
  rope_ids = np.concatenate([np.repeat(prompt_ids, n, axis=0), response], axis=1)
  attention_mask = np.concatenate([np.repeat(prompt_mask, n, axis=0), response_mask], axis=1)
  grids = np.asarray(groups.get("image_grid_thw", np.zeros((0, 3), np.int32))).reshape(-1, 3)
  has_images = len(grids) > 0
  if has_images:
    images = images_per_row(groups, model_config)
    row_grids = np.concatenate([grids[images[p]] for p in range(b) for _ in range(n)])
  positions = prepare_inputs(model_config, rope_ids, attention_mask,
                             row_grids if has_images else None)["position_ids"]
  prompt_len = prompt_ids.shape[1]
  out["prompt_position_ids"] = positions[:, ::n, :prompt_len]
  out["response_position_ids"] = positions[:, :, prompt_len:]
  if has_images:
    out["pixel_values"] = np.asarray(groups["pixel_values"], np.float32)
    out["vision_inputs"] = prepare_inputs(model_config, prompt_ids, prompt_mask,
                                          grids)["vision_inputs"]
  return out


def minibatch_groups(num_groups: int, update_groups: int,
                     micro_batches: int) -> list[list[np.ndarray]]:
  """Group indices per optimiser step, split into `micro_batches` accumulation slices, in order."""
  if num_groups % update_groups:
    raise ValueError(f"{num_groups} groups do not split into update batches of {update_groups}")
  if update_groups % micro_batches:
    raise ValueError(f"update batch of {update_groups} groups does not split into "
                     f"{micro_batches} micro-batches")
  per_micro = update_groups // micro_batches
  return [[np.arange(first + m * per_micro, first + (m + 1) * per_micro)
           for m in range(micro_batches)] for first in range(0, num_groups, update_groups)]


# ----------------------------------------------------------------------------- RIF-RFT

def collect_groups(next_groups: Callable[[], Batch], *, target: int, mode: str,
                   low: float = 0.01, high: float = 0.99, max_batches: int | None = 8,
                   pad_id: int, model_config) -> tuple[Batch, dict[str, float]]:
  """`target` graded groups for one update; mode 'online' filters and refills.

  next_groups() samples and grades the next rollout batch (group layout). With 'none' or
  'offline' one batch is used as is. With 'online', groups whose mean accuracy is <= low or
  >= high (no learning signal) are dropped and further batches are drawn until `target`
  groups remain (at most `max_batches` batches, then RuntimeError).
  """
  mode = filtering.FilterMode.parse(mode)
  if mode != filtering.FilterMode.ONLINE:
    groups = next_groups()
    if len(groups["prompt_ids"]) != target:
      raise ValueError(f"rollout batch has {len(groups['prompt_ids'])} groups, expected {target}")
    return groups, {}
  refill = filtering.GroupRefill(target, max_batches=max_batches)
  parts = []
  while not refill.ready:
    groups = next_groups()
    keep = filtering.filter_groups(groups["accuracy"], low=low, high=high)
    refill.add({"part": np.full(len(keep), len(parts)), "row": np.arange(len(keep))}, keep)
    parts.append(groups)
  picked, stats = refill.pop()
  kept = [take_rows(part, picked["row"][picked["part"] == i], model_config)
          for i, part in enumerate(parts) if (picked["part"] == i).any()]
  return concat_groups(kept, pad_id), {f"online_filter/{k}": float(v) for k, v in stats.items()}


def offline_filter(sample: Callable[[Batch], Batch], batches: Iterable[Batch], *,
                   batch_size: int, model_config, drop_all_wrong: bool = True,
                   drop_all_right: bool = False) -> tuple[np.ndarray, dict[str, Any]]:
  """Offline RIF-RFT over a task's training set: returns (kept instance ids, stats).

  sample(batch) -> group batch (n graded rollouts per prompt, e.g. `sample_groups` with the
  current model). `batches` visits every instance once (the last batch may be partial: it is
  padded to `batch_size`, so no new program compiles). An instance is correct in a rollout
  when its accuracy is 1. Stats are `filtering.filter_instances`' overall and per task
  (`per_task/<task>/kept_fraction`, ...).
  """
  ids, tasks, correct = [], [], []
  for batch in batches:
    batch = {k: v for k, v in batch.items() if k not in DERIVED_KEYS}
    padded, real = pad_rows(batch, batch_size, model_config)
    groups = sample(padded)
    ids.append(np.asarray(batch["id"]).astype(str))
    tasks.append(np.asarray(batch["task"]).astype(str))
    correct.append(groups["accuracy"][:real] > 0.5)
  if not ids:
    raise ValueError("offline_filter got no batches: the training set is empty")
  ids, tasks, correct = np.concatenate(ids), np.concatenate(tasks), np.concatenate(correct)
  keep, stats = filtering.filter_instances(correct, drop_all_wrong, drop_all_right)
  for task in sorted(set(tasks)):
    sel = tasks == task
    _, task_stats = filtering.filter_instances(correct[sel], drop_all_wrong, drop_all_right)
    stats.update({f"per_task/{task}/{k}": v for k, v in task_stats.items()
                  if k != "pass_count_hist"})
  return ids[keep], stats


class SubsetSource:
  """The records of a random-access source whose `id` is in `keep_ids` (offline RIF-RFT)."""

  def __init__(self, source: Any, keep_ids: Iterable[str]):
    keep = set(str(i) for i in keep_ids)
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    self.source = source
    self.indices = np.asarray([i for i in range(len(source)) if text(source[i]["id"]) in keep],
                              np.int64)
    if not len(self.indices):
      raise ValueError(f"no record of the source has an id among the {len(keep)} kept ids")

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> Any:
    return self.source[int(self.indices[index])]


def offline_rif_sources(path: str, sources: Sequence[Any],
                        run_filter: Callable[[], tuple[np.ndarray, dict[str, Any]]]
                        ) -> tuple[list[Any], dict[str, Any]]:
  """Offline RIF-RFT of a run (or a continual stage): its training sources cut to the kept
  instances, and the filter's stats.

  The kept ids are chosen once: `run_filter()` (e.g. `offline_filter` with the current model)
  runs when `path` does not exist yet, and its result is written there atomically, so that a
  resumed run trains on the set it chose at its start. `sources` are
  `data.pipeline.TaskSource`s. Keeping no instance is an error.
  """
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    keep_ids, stats = np.asarray(saved["kept_ids"]), saved["stats"]
  else:
    start = time.perf_counter()
    keep_ids, stats = run_filter()
    stats["seconds"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump({"kept_ids": np.asarray(keep_ids).tolist(), "stats": stats}, f)
    os.replace(path + ".tmp", path)
  tasks = sorted({ts.task for ts in sources})
  if not len(keep_ids):
    raise ValueError(f"offline RIF-RFT kept no instance of {tasks}: the model gets every one "
                     "wrong in all rollouts; train it more (e.g. SFT) before RFT")
  return [dataclasses.replace(ts, source=SubsetSource(ts.source, keep_ids))
          for ts in sources], stats
