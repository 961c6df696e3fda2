from __future__ import annotations

import os
import shutil
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from cpt_jax import checkpoint
from cpt_jax.train import optim


def make_state(seed=0):
  rng = np.random.default_rng(seed)
  # Layer lists become int-keyed dicts in nnx pure dicts, as in the real model.
  params = {"embed": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
            "layers": {0: {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)},
                       1: {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}},
            "visual": {"kernel": jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)}}
  config = ConfigDict(dict(name="adamw", lr=1e-2, schedule="cosine", warmup_ratio=0.1, b1=0.9,
                           b2=0.999, eps=1e-8, weight_decay=0.01, momentum=0.0, grad_clip_norm=1.0,
                           grad_accum_steps=2, freeze=("visual",)))
  opt = optim.make_optimizer(config, params, 10)
  state = optim.create_train_state(params, opt, jax.random.PRNGKey(seed))
  grads = jax.tree.map(jnp.ones_like, params)
  step = jax.jit(lambda s: optim.apply_gradients_or_skip(s, grads, jnp.float32(1.0), opt)[0])
  for _ in range(3):   # non-trivial moments, accumulators and counters
    state = step(state)
  return state


def data_iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=3).map(lambda x: x * 2).to_iter_dataset())


def assert_states_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def abstract_of(state, sharding):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state)


@pytest.fixture(scope="module")
def state():
  return make_state()


def test_roundtrip_with_data_iterator_and_metadata(tmp_path, state):
  it = data_iterator()
  seen = [next(it) for _ in range(5)]
  ckpt = checkpoint.Checkpointer(tmp_path, handle_sigterm=False)
  ckpt.save(3, state, data_iter=it, metadata={"task_index": 2, "tasks": ["gqa", "vizwiz"]})
  expected_next = [next(it) for _ in range(4)]   # iterator moves on after the save
  ckpt.close()

  ckpt = checkpoint.Checkpointer(tmp_path, handle_sigterm=False)
  fresh = data_iterator()
  dev = jax.devices()[0]
  restored, meta = ckpt.restore_latest(abstract_of(state, jax.sharding.SingleDeviceSharding(dev)),
                                       data_iter=fresh)
  ckpt.close()
  assert_states_equal(restored, state)
  assert meta == {"task_index": 2, "tasks": ["gqa", "vizwiz"]}
  assert [next(fresh) for _ in range(4)] == expected_next
  assert len(set(seen) | set(expected_next)) == 9


def test_keeps_n_and_ignores_half_written_steps(tmp_path, state):
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2, handle_sigterm=False)
  for step in (2, 4, 6):
    ckpt.save(step, state.replace(step=jnp.int32(step)))
  ckpt.wait()
  assert ckpt.manager.all_steps() == [4, 6]
  ckpt.close()
  # A save cut short leaves only Orbax's temporary directory, never a step directory.
  shutil.copytree(tmp_path / "6", tmp_path / "8.orbax-checkpoint-tmp")
  os.remove(tmp_path / "8.orbax-checkpoint-tmp" / "_CHECKPOINT_METADATA")
  ckpt = checkpoint.Checkpointer(tmp_path, handle_sigterm=False)
  assert ckpt.latest_step() == 6
  restored, _ = ckpt.restore_latest(jax.eval_shape(lambda: state))
  assert int(restored.step) == 6
  # The resumed run reaches step 8 again and saves it over the leftover.
  ckpt.save(8, state.replace(step=jnp.int32(8)))
  ckpt.wait()
  assert ckpt.latest_step() == 8
  ckpt.close()
  assert checkpoint.Checkpointer(tmp_path / "empty", handle_sigterm=False).restore_latest(
      jax.eval_shape(lambda: state)) is None


def test_restore_onto_mesh_and_params_only(tmp_path, state):
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  split, rep = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P())
  param_sh = jax.tree.map(lambda x: split if x.shape[0] % 8 == 0 else rep, state.params)
  state_sh = optim.state_shardings(jax.eval_shape(lambda: state), param_sh, rep)
  sharded = jax.device_put(state, state_sh)
  ckpt = checkpoint.Checkpointer(tmp_path, handle_sigterm=False)
  ckpt.save(1, sharded)
  ckpt.wait()
  # Saved sharded over 8 devices; restored both sharded and onto one device.
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          state, state_sh)
  restored, _ = ckpt.restore(1, abstract)
  ckpt.close()
  assert restored.params["embed"].sharding == split
  assert_states_equal(restored, state)
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = checkpoint.restore_params(tmp_path, abstract_of(state.params, one))
  assert_states_equal(params, state.params)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    checkpoint.restore_params(tmp_path / "none", abstract_of(state.params, one))


def test_sigterm_requests_a_save(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path)
  try:
    assert not ckpt.reached_preemption(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.reached_preemption(2)
  finally:
    ckpt.close()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_relative_directory(tmp_path, monkeypatch, state):
  """A relative workdir (`--workdir=runs/demo`) saves asynchronously and restores: Orbax itself
  refuses relative paths in its background writer."""
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoint.Checkpointer("runs/x/checkpoints", handle_sigterm=False)
  ckpt.save(1, state)
  ckpt.close()
  assert (tmp_path / "runs/x/checkpoints/1").is_dir()
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  ckpt = checkpoint.Checkpointer("runs/x/checkpoints", handle_sigterm=False)
  restored, _ = ckpt.restore_latest(abstract_of(state, dev))
  ckpt.close()
  assert_states_equal(restored, state)
  params = checkpoint.restore_params("runs/x/checkpoints", abstract_of(state, dev).params)
  jax.tree.map(np.testing.assert_array_equal, params, state.params)
