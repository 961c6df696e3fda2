"""Reservoir replay buffer as a pure, jit-friendly pytree.

`ReservoirBuffer` holds fixed-size arrays (images, labels, task ids) plus the number of
stream examples seen. `add` implements reservoir sampling exactly: the n-th valid example
seen goes to slot n-1 while the buffer fills, afterwards it replaces a uniformly chosen
slot with probability size/n, so every example seen so far is in memory with the same
probability size/seen. Within one batch the examples are processed in order (a later
example that draws the same slot overwrites an earlier one), as a sequential loop would.

Where the arrays live is the caller's choice (`place_buffer`): on the accelerator next to
the model, or on the host CPU device to save accelerator memory (samples are then copied
to the accelerator for each step).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class ReservoirBuffer:
  images: jax.Array  # [M, H, W, C] uint8
  labels: jax.Array  # [M] int32
  task_ids: jax.Array  # [M] int32
  seen: jax.Array  # [] int32: valid stream examples offered to the buffer so far

  @property
  def size(self) -> int:
    return self.labels.shape[0]

  @property
  def num_filled(self) -> jax.Array:
    return jnp.minimum(self.seen, self.size)


def init_buffer(size: int, image_shape: tuple[int, ...], image_dtype=jnp.uint8) -> ReservoirBuffer:
  if size < 1:
    raise ValueError(f"buffer size must be >= 1, got {size}")
  return ReservoirBuffer(
      images=jnp.zeros((size, *image_shape), image_dtype),
      labels=jnp.zeros((size,), jnp.int32),
      task_ids=jnp.zeros((size,), jnp.int32),
      seen=jnp.zeros((), jnp.int32))


def place_buffer(buffer: ReservoirBuffer, storage: str) -> ReservoirBuffer:
  """storage 'device': the default accelerator; 'host': the host CPU device."""
  if storage == "device":
    return jax.device_put(buffer, jax.devices()[0])
  if storage == "host":
    return jax.device_put(buffer, jax.devices("cpu")[0])
  raise ValueError(f"buffer storage must be 'device' or 'host', got {storage!r}")


def reservoir_slots(rng: jax.Array, seen: jax.Array, valid: jax.Array, size: int) -> jax.Array:
  """Slot each example of a batch is written to, or `size` (= dropped).

  seen: examples seen before this batch; valid [B] bool marks real (non-padding) examples.
  """
  count = seen + jnp.cumsum(valid.astype(jnp.int32))  # [B] 1-based index in the stream
  draw = jax.random.randint(rng, valid.shape, 0, jnp.maximum(count, 1))  # uniform in [0, count)
  slot = jnp.where(count <= size, count - 1, draw)
  slot = jnp.where(valid & (slot < size), slot, size)
  # Sequential semantics: an example is overwritten by a later one in the same batch
  # that picks the same slot, so only the last writer of each slot is kept.
  batch = jnp.arange(valid.shape[0])
  later_same_slot = (slot[:, None] == slot[None, :]) & (batch[None, :] > batch[:, None])  # [B, B]
  overwritten = jnp.any(later_same_slot, axis=1)
  return jnp.where(overwritten, size, slot)


def add(buffer: ReservoirBuffer, images: jax.Array, labels: jax.Array, task_ids: jax.Array,
        rng: jax.Array, valid: jax.Array | None = None) -> ReservoirBuffer:
  """Offers a batch (images [B, ...], labels [B], task_ids [B]) to the reservoir."""
  if valid is None:
    valid = jnp.ones(labels.shape, bool)
  if images.shape[1:] != buffer.images.shape[1:]:
    raise ValueError(f"buffer holds images {buffer.images.shape[1:]}, got {images.shape[1:]}")
  slot = reservoir_slots(rng, buffer.seen, valid, buffer.size)
  write = lambda store, x: store.at[slot].set(x.astype(store.dtype), mode="drop")
  return dataclasses.replace(
      buffer,
      images=write(buffer.images, images),
      labels=write(buffer.labels, labels),
      task_ids=write(buffer.task_ids, task_ids),
      seen=buffer.seen + jnp.sum(valid.astype(jnp.int32)))


def sample(buffer: ReservoirBuffer, rng: jax.Array, num: int) -> dict[str, jax.Array]:
  """num examples drawn uniformly without replacement from the filled slots.

  Returns images, labels, task_ids and `valid` [num] (False where the buffer holds fewer
  than num examples; those rows repeat slot contents and must be masked by the caller).
  """
  if num > buffer.size:
    raise ValueError(f"cannot sample {num} examples from a buffer of size {buffer.size}")
  scores = jax.random.uniform(rng, (buffer.size,))
  filled = jnp.arange(buffer.size) < buffer.num_filled
  # The num largest random scores over filled slots are a uniform subset without replacement.
  _, index = jax.lax.top_k(jnp.where(filled, scores, -1.0), num)
  return {"images": buffer.images[index], "labels": buffer.labels[index],
          "task_ids": buffer.task_ids[index], "valid": filled[index]}
