"""Checkpoints: train state, data-iterator position and JSON metadata, via Orbax.

Layout of `<workdir>/checkpoints/<step>/`:
  params/    float32 weights (restorable alone, e.g. to start RFT from an SFT run)
  train/     step, optimizer state, rng, skipped-update count
  data/      the Grain iterator state, one JSON file per process
  metadata/  free JSON (e.g. continual-learning progress)

Orbax writes a step into a temporary directory and renames it when complete, so a
crash mid-save never leaves a half-written step as the latest one.
"""
from __future__ import annotations

import os
import signal
from typing import Any

import grain
import grain.checkpoint  # noqa: F401  (registers the Grain iterator handler with Orbax)
import jax
import orbax.checkpoint as ocp
from absl import logging

from cpt_jax.train.optim import TrainState

PyTree = Any


def absolute(directory) -> str:
  """`directory` as Orbax needs it: local paths made absolute, URLs (gs://...) unchanged."""
  directory = os.fspath(directory)
  return directory if "://" in directory else os.path.abspath(directory)


class Checkpointer:
  """Saves and restores `TrainState` (+ data iterator, + metadata) under `directory`.

  Saves are asynchronous: `save` returns once the arrays are copied off the
  devices; `wait` blocks until the files are complete. Keeps the newest
  `max_to_keep` steps.
  """

  def __init__(self, directory, *, max_to_keep: int | None = 3, async_save: bool = True,
               handle_sigterm: bool = True):
    self.manager = ocp.CheckpointManager(
        absolute(directory), options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True))
    self._sigterm = False
    self._previous_handler = None
    # On several processes JAX's preemption service owns SIGTERM and syncs the
    # save step across hosts (see `reached_preemption`).
    if handle_sigterm and jax.process_count() == 1:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del frame
    logging.warning("Received signal %d: saving a checkpoint at the next step, then stopping.",
                    signum)
    self._sigterm = True

  def reached_preemption(self, step: int) -> bool:
    """True when the job was told to stop (SIGTERM) and should save and exit now."""
    return self._sigterm or self.manager.reached_preemption(step)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, *, data_iter=None,
           metadata: dict | None = None, force: bool = False) -> bool:
    """Starts saving `state` (and the iterator position, and `metadata`) as `step`."""
    items = {
        "params": ocp.args.StandardSave(state.params),
        "train": ocp.args.StandardSave(_train_part(state)),
        "metadata": ocp.args.JsonSave(metadata or {}),
    }
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: TrainState, *,
              data_iter=None) -> tuple[TrainState, dict]:
    """Restores `step` with the shapes, dtypes and shardings of `abstract_state`.

    `data_iter` (a Grain iterator) is moved to the saved position in place.
    """
    items = {
        "params": ocp.args.StandardRestore(abstract_state.params),
        "train": ocp.args.StandardRestore(_train_part(abstract_state)),
        "metadata": ocp.args.JsonRestore(),
    }
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    train = out["train"]
    state = TrainState(step=train["step"], params=out["params"], opt_state=train["opt_state"],
                       rng=train["rng"], skipped=train["skipped"])
    return state, dict(out["metadata"] or {})

  def restore_latest(self, abstract_state: TrainState, *,
                     data_iter=None) -> tuple[TrainState, dict] | None:
    """The newest complete checkpoint, or None when there is none."""
    step = self.latest_step()
    if step is None:
      return None
    logging.info("Restoring checkpoint step %d from %s", step, self.manager.directory)
    return self.restore(step, abstract_state, data_iter=data_iter)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    """Waits for pending saves, releases the manager, restores the SIGTERM handler."""
    self.manager.close()
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None


def _train_part(state: TrainState) -> dict:
  return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng,
          "skipped": state.skipped}


def restore_params(directory, abstract_params: PyTree, step: int | None = None) -> PyTree:
  """Only the weights of a checkpoint directory (the newest step by default)."""
  with ocp.CheckpointManager(absolute(directory), options=ocp.CheckpointManagerOptions(
      read_only=True)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no complete checkpoint under {directory}")
    out = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))
  return out["params"]
