from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

import cpt_jax  # noqa: F401  (flax eager sharding off)
from cpt_jax import sharding
from cpt_jax.train import optim, sft

VOCAB, DIM = 32, 16


class ToyLM(nnx.Module):
  """A causal toy LM with the model call signature: each position sees itself and
  the previous token; a 'visual' Linear adds pooled pixel features."""

  def __init__(self, *, rngs: nnx.Rngs):
    init = nnx.initializers.normal(0.5)
    self.embed = nnx.Param(init(rngs.params(), (VOCAB, DIM)), out_sharding=("vocab", "embed"))
    self.w_cur = nnx.Param(init(rngs.params(), (DIM, DIM)), out_sharding=("embed", "mlp"))
    self.w_prev = nnx.Param(init(rngs.params(), (DIM, DIM)), out_sharding=("embed", "mlp"))
    self.out = nnx.Param(init(rngs.params(), (DIM, VOCAB)), out_sharding=("mlp", "vocab"))
    self.visual = nnx.Linear(4, DIM, rngs=rngs)

  def hidden_states(self, input_ids, attention_mask=None, position_ids=None, pixel_values=None,
                    vision_inputs=None):
    x = self.embed[...][input_ids]                       # [B, S, D]
    if pixel_values is not None:
      x = x + self.visual(pixel_values).mean(axis=0)
    prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
    return jnp.tanh(x @ self.w_cur[...] + prev @ self.w_prev[...])

  def head_kernel(self):
    return self.out[...]

  def __call__(self, input_ids, **kwargs):
    return (self.hidden_states(input_ids, **kwargs) @ self.out[...]).astype(jnp.float32)


def optim_config(**kw):
  c = ConfigDict(dict(name="adamw", lr=1e-2, schedule="constant", warmup_ratio=0.0, b1=0.9,
                      b2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.0, grad_clip_norm=1.0,
                      grad_accum_steps=1, freeze=()))
  c.update(kw)
  return c


def split_model(seed=0):
  graphdef, params = nnx.split(ToyLM(rngs=nnx.Rngs(seed)), nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def make_batch(rng: np.random.Generator, b=4, s=8, with_pixels=True):
  ids = rng.integers(0, VOCAB, (b, s)).astype(np.int32)
  lengths = rng.integers(4, s + 1, (b,))
  attn = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
  loss_mask = attn * (np.arange(s)[None] >= 3)
  batch = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask.astype(np.int32),
           "task": np.array(["a", "b"] * (b // 2))}
  if with_pixels:
    batch["pixel_values"] = rng.normal(size=(6, 4)).astype(np.float32)
  return batch


def reference_loss(logits, ids, loss_mask):
  """Numpy log-softmax by hand."""
  x = logits[:, :-1].astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
  tgt = ids[:, 1:]
  nll = -np.take_along_axis(logp, tgt[..., None], -1)[..., 0]
  m = loss_mask[:, 1:]
  acc = ((logits[:, :-1].argmax(-1) == tgt) * m).sum() / m.sum()
  return (nll * m).sum() / m.sum(), acc, m.sum()


@pytest.fixture(scope="module")
def setup():
  graphdef, params = split_model()
  opt = optim.make_optimizer(optim_config(), params, total_steps=100)
  return graphdef, params, opt, sft.make_train_step(graphdef, opt)


def new_state(params, opt):
  return optim.create_train_state(jax.tree.map(jnp.array, params), opt, jax.random.PRNGKey(0))


def test_step_loss_matches_hand_computed(setup):
  graphdef, params, opt, step = setup
  batch = make_batch(np.random.default_rng(0))
  model = nnx.merge(graphdef, nnx.State(params))
  logits = np.asarray(model(batch["input_ids"], pixel_values=batch["pixel_values"]))
  want_loss, want_acc, want_n = reference_loss(logits, batch["input_ids"], batch["loss_mask"])
  _, metrics = step(new_state(params, opt), sft.device_batch(batch))
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["accuracy"], want_acc, rtol=1e-6)
  assert metrics["answer_tokens"] == want_n
  assert metrics["tokens"] == batch["attention_mask"].sum()
  assert metrics["skipped"] == 0
  text_only = sft.device_batch({**batch, "pixel_values": np.zeros((0, 4), np.float32)})
  assert sorted(text_only) == ["attention_mask", "input_ids", "loss_mask"]
  with pytest.raises(ValueError, match=r"lacks \['loss_mask'\]"):
    sft.device_batch({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})


def test_loss_ignores_non_answer_tokens():
  logits = jax.random.normal(jax.random.PRNGKey(1), (2, 5, VOCAB))
  ids = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
  mask = jnp.array([[0, 0, 1, 1, 0], [0, 0, 0, 1, 0]])
  loss_fn = jax.jit(sft.loss_fn)
  loss, aux = loss_fn(logits, ids, mask)
  # Change the predictions at positions 0 and 3 (they score tokens 1 and 4: not answers).
  changed = logits.at[:, 0].set(100.0).at[:, 3:].add(7.0)
  loss2, _ = loss_fn(changed, ids, mask)
  np.testing.assert_allclose(loss, loss2, rtol=1e-6)
  assert aux["answer_tokens"] == 3
  zero, _ = loss_fn(logits, ids, jnp.zeros_like(mask))
  assert zero == 0.0


def test_nan_batch_is_skipped_bit_identically(setup):
  graphdef, params, opt, step = setup
  rng = np.random.default_rng(1)
  state, _ = step(new_state(params, opt), sft.device_batch(make_batch(rng)))
  before = jax.device_get(state)
  bad = make_batch(rng)
  bad["pixel_values"][0, 0] = np.nan
  state, metrics = step(state, sft.device_batch(bad))
  after = jax.device_get(state)
  assert not np.isfinite(metrics["loss"]) and metrics["skipped"] == 1
  assert after.skipped == 1 and after.step == 2
  for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                  jax.tree.leaves((after.params, after.opt_state))):
    np.testing.assert_array_equal(a, b)
  # The next finite batch trains again.
  state, metrics = step(state, sft.device_batch(make_batch(rng)))
  assert metrics["skipped"] == 0 and int(state.skipped) == 1


def test_steps_per_call_runs_the_steps_in_one_program(setup):
  graphdef, params, opt, step = setup
  rng = np.random.default_rng(5)
  batches = [sft.device_batch(make_batch(rng)) for _ in range(3)]
  batches[1]["pixel_values"] = batches[1]["pixel_values"].copy()
  batches[1]["pixel_values"][0, 0] = np.nan  # the middle step is skipped inside the program
  state, want = new_state(params, opt), []
  for batch in batches:
    state, metrics = step(state, batch)
    want.append(metrics)
  multi = sft.make_train_step(graphdef, opt, steps_per_call=3)
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *batches)
  got_state, got = multi(new_state(params, opt), stacked)
  np.testing.assert_array_equal(got["skipped"], [0, 1, 0])
  for i, metrics in enumerate(want):
    for k in ("loss", "accuracy", "grad_norm", "lr"):
      np.testing.assert_allclose(got[k][i], metrics[k], rtol=1e-5)
  assert int(got_state.step) == 3 and int(got_state.skipped) == 1
  for a, b in zip(jax.tree.leaves((got_state.params, got_state.opt_state)),
                  jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="steps_per_call must be >= 1, got 0"):
    sft.make_train_step(graphdef, opt, steps_per_call=0)


def copy_task_batch(rng, b=16):
  """[q, 1, q] with the answer q (and the prefix masked): learnable only by looking back."""
  q = rng.integers(2, VOCAB, (b,))
  ids = np.stack([q, np.ones_like(q), q], axis=1).astype(np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids),
          "loss_mask": np.array([[0, 0, 1]] * b, np.int32)}


def test_loss_chunks_give_the_unchunked_step(setup):
  graphdef, params, opt, step = setup
  batch = sft.device_batch(make_batch(np.random.default_rng(2)))  # 4 x 8 tokens
  chunked = sft.make_train_step(graphdef, opt, loss_chunk=5)  # 7 chunks, the last padded
  want, want_m = step(new_state(params, opt), batch)
  got, got_m = chunked(new_state(params, opt), batch)
  np.testing.assert_allclose(got_m["loss"], want_m["loss"], rtol=1e-6)
  np.testing.assert_allclose(got_m["grad_norm"], want_m["grad_norm"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_bf16_compute_keeps_float32_master(setup):
  graphdef, params, opt, _ = setup
  step = sft.make_train_step(graphdef, opt, compute_dtype=jnp.bfloat16,
                             remat_policy="dots_with_no_batch_dims_saveable")
  state, m = step(new_state(params, opt), sft.device_batch(make_batch(np.random.default_rng(0))))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  _, m32 = setup[3](new_state(params, opt), sft.device_batch(make_batch(np.random.default_rng(0))))
  np.testing.assert_allclose(m["loss"], m32["loss"], rtol=2e-2)
  with pytest.raises(ValueError, match="unknown remat_policy"):
    sft.make_train_step(graphdef, opt, remat_policy="nope")


def test_eval_summary_per_task(setup):
  graphdef, params, _, _ = setup
  batch = make_batch(np.random.default_rng(2))
  scores = jax.device_get(sft.make_eval_step(graphdef)(params, sft.device_batch(batch)))
  summary = sft.summarize_eval([scores], [batch["task"]])
  assert set(summary) == {f"{t}/{m}" for t in ("a", "b", "all")
                          for m in ("exact_match", "token_accuracy", "nll")}
  model = nnx.merge(graphdef, nnx.State(params))
  logits = np.asarray(model(batch["input_ids"], pixel_values=batch["pixel_values"]))
  rows = batch["task"] == "a"
  want, _, _ = reference_loss(logits[rows], batch["input_ids"][rows], batch["loss_mask"][rows])
  np.testing.assert_allclose(summary["a/nll"], want, rtol=1e-5)


def test_step_on_8_device_mesh_matches_single_device(setup):
  graphdef, params, opt, step = setup
  batch = sft.device_batch(make_batch(np.random.default_rng(4), b=8))
  ref_state, ref_metrics = step(new_state(params, opt), batch)

  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  abstract = nnx.eval_shape(lambda: ToyLM(rngs=nnx.Rngs(0)))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(abstract, nnx.Param)))
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, sharding.logical_to_spec(s)), specs,
                          is_leaf=lambda x: isinstance(x, P))
  replicated = NamedSharding(mesh, P())
  abstract_state = jax.eval_shape(lambda: new_state(params, opt))
  state_sh = optim.state_shardings(abstract_state, param_sh, replicated)
  state = jax.device_put(new_state(params, opt), state_sh)
  assert state.params["embed"].sharding.spec == P("tensor", "fsdp")
  batch_sh = {k: NamedSharding(mesh, sharding.logical_to_spec(("batch",) + (None,) * (v.ndim - 1)))
              for k, v in batch.items()}
  batch_sh["pixel_values"] = replicated
  with jax.set_mesh(mesh):
    mesh_step = sft.make_train_step(graphdef, opt, state_sharding=state_sh)
    state, metrics = mesh_step(state, jax.device_put(batch, batch_sh))
  assert state.params["w_cur"].sharding.spec == P("fsdp", "tensor")
  for k in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loss_falls_with_the_qwen_model_on_copy_task():
  from cpt_jax import models  # noqa: PLC0415
  config = models.ModelConfig.tiny(vocab_size=VOCAB + 8).replace(vision=None)
  graphdef, params = nnx.split(models.init_from_config(config, 0), nnx.Param)
  params = nnx.to_pure_dict(params)
  opt = optim.make_optimizer(optim_config(lr=1e-2, schedule="cosine", warmup_ratio=0.1),
                             params, total_steps=60)
  step = sft.make_train_step(graphdef, opt)
  state = new_state(params, opt)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(60):
    state, metrics = step(state, copy_task_batch(rng))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.25 * losses[0], (losses[0], losses[-1])
