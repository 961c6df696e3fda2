"""Reservoir replay buffer: exact reservoir statistics, masking, sampling, placement."""
from __future__ import annotations

import cpt_jax  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.paretocl import buffer as rb

STREAM, SIZE, BATCH = 50, 10, 8  # 50 items in batches of 8 (the last one half padding)


def _stream_into_buffer(rng):
  """Streams items 0..STREAM-1 (the label is the item id) into a fresh buffer."""
  buf = rb.init_buffer(SIZE, (1,))
  num_batches = -(-STREAM // BATCH)
  ids = jnp.arange(num_batches * BATCH).reshape(num_batches, BATCH)
  for i in range(num_batches):
    valid = ids[i] < STREAM
    buf = rb.add(buf, ids[i][:, None].astype(jnp.uint8), ids[i], jnp.zeros(BATCH, jnp.int32),
                 jax.random.fold_in(rng, i), valid)
  return buf


def test_reservoir_inclusion_frequency_is_size_over_seen():
  seeds = 4000
  bufs = jax.jit(jax.vmap(_stream_into_buffer))(jax.random.split(jax.random.key(0), seeds))
  labels = np.asarray(bufs.labels)  # [seeds, SIZE]
  assert np.all(np.asarray(bufs.seen) == STREAM)
  # Full, and every slot holds a distinct real item (padding is never stored).
  assert all(len(set(row)) == SIZE for row in labels)
  assert labels.max() < STREAM
  np.testing.assert_array_equal(np.asarray(bufs.images)[..., 0], labels)
  frequency = np.bincount(labels.ravel(), minlength=STREAM) / seeds
  # Binomial std sqrt(0.2 * 0.8 / 4000) = 0.0063; allow ~5 sigma per item.
  np.testing.assert_allclose(frequency, SIZE / STREAM, atol=0.03)


def test_buffer_fills_in_order_before_replacing():
  buf = rb.init_buffer(4, (1,))
  buf = rb.add(buf, jnp.zeros((3, 1), jnp.uint8), jnp.array([7, 8, 9]), jnp.array([1, 1, 1]),
               jax.random.key(0), jnp.array([True, False, True]))
  assert int(buf.seen) == 2 and int(buf.num_filled) == 2
  np.testing.assert_array_equal(buf.labels[:2], [7, 9])
  np.testing.assert_array_equal(buf.task_ids[:2], [1, 1])


def test_reservoir_slots_last_writer_wins():
  # Once full, draws are uniform in [0, count): a slot drawn twice in a batch keeps the later item.
  slots = np.asarray(jax.jit(rb.reservoir_slots, static_argnums=3)(
      jax.random.key(3), jnp.array(100), jnp.ones(256, bool), 50))
  kept = slots[slots < 50]
  assert len(kept) == len(set(kept))


def test_sample_without_replacement_from_filled_slots():
  buf = rb.init_buffer(16, (2,))
  buf = rb.add(buf, jnp.ones((6, 2), jnp.uint8), jnp.arange(6), jnp.zeros(6, jnp.int32),
               jax.random.key(0))
  out = rb.sample(buf, jax.random.key(1), 4)
  labels = np.asarray(out["labels"])
  assert out["images"].shape == (4, 2) and np.all(out["valid"])
  assert len(set(labels)) == 4 and labels.max() < 6
  # Asking for more than is stored marks the surplus rows invalid.
  out = rb.sample(buf, jax.random.key(2), 10)
  assert int(out["valid"].sum()) == 6
  assert sorted(np.asarray(out["labels"])[np.asarray(out["valid"])]) == list(range(6))
  # Uniform over filled slots.
  keys = jax.random.split(jax.random.key(3), 3000)
  draws = jax.vmap(lambda k: rb.sample(buf, k, 2)["labels"])(keys)
  np.testing.assert_allclose(np.bincount(np.asarray(draws).ravel(), minlength=6) / 6000, 1 / 6,
                             atol=0.03)
  with pytest.raises(ValueError, match="cannot sample"):
    rb.sample(buf, jax.random.key(0), 17)


def test_placement():
  buf = rb.place_buffer(rb.init_buffer(4, (2, 2, 3)), "host")
  assert buf.images.devices() == {jax.devices("cpu")[0]}
  with pytest.raises(ValueError, match="storage"):
    rb.place_buffer(buf, "disk")
