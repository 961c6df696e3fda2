"""Metric writer (process 0 only): JSONL + TensorBoard + config.json + a progress bar.

`<workdir>/metrics.jsonl` has one JSON object per written step: {"step": s, "loss": ...}.
On resume, lines for steps after the restored checkpoint are dropped (they will be redone).
"""
from __future__ import annotations

import json
import numbers
import os
import sys
from typing import Any, Mapping

import jax
import numpy as np
import tqdm
from absl import logging


def _import_tensorboardx():
  """tensorboardX imports torch whenever it is installed (to accept torch tensors); we log
  numpy scalars, so hide torch from that import: it costs seconds and is test-only here."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    if hide:
      del sys.modules["torch"]
  return tensorboardX


SummaryWriter = _import_tensorboardx().SummaryWriter

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
# Shown in the progress bar, in this order, when present.
BAR_KEYS = ("loss", "lr", "tokens_per_s", "skipped_total")


def _scalar(value: Any) -> float | int:
  value = np.asarray(value)
  if value.size != 1:
    raise ValueError(f"metrics must be scalars, got shape {value.shape}")
  value = value.item()
  return value if isinstance(value, numbers.Number) else float(value)


class MetricWriter:
  """Writes scalar metrics per step. Silent (but callable) on processes other than 0."""

  def __init__(self, workdir: str | os.PathLike, *, config=None, total_steps: int | None = None,
               start_step: int = 0, progress_bar: bool = True):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if config is not None:
      text = config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") \
          else json.dumps(config, indent=2, default=str)
      with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(text)
    self.path = os.path.join(workdir, METRICS_FILE)
    _truncate_after(self.path, start_step)
    self.jsonl = open(self.path, "a")
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.bar = (tqdm.tqdm(total=total_steps, initial=start_step, dynamic_ncols=True,
                          unit="step") if progress_bar else None)
    self._bar_step = start_step

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """One JSONL line, TensorBoard scalars and a progress-bar update for `step`."""
    if not self.enabled:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
    self.jsonl.flush()
    for k, v in values.items():
      self.tb.add_scalar(k, v, step)
    if self.bar is not None:
      self.bar.update(max(0, step - self._bar_step))
      self._bar_step = max(self._bar_step, step)
      shown = {k: values[k] for k in BAR_KEYS if k in values}
      if shown:
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)

  def log(self, message: str, *args) -> None:
    """A log line that does not break the progress bar."""
    if not self.enabled:
      return
    logging.info(message, *args)

  def close(self) -> None:
    if not self.enabled:
      return
    self.jsonl.close()
    self.tb.close()
    if self.bar is not None:
      self.bar.close()


def _truncate_after(path: str, step: int) -> None:
  """Drops lines of steps > `step` (written before a crash, redone after the resume)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line)
    except (ValueError, KeyError):  # a line cut short by a crash
      continue
  if len(kept) != len(lines):
    with open(path, "w") as f:
      f.writelines(kept)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All JSONL records of a workdir, in file order."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]
