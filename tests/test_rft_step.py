"""GRPO step on a tiny Qwen2.5-VL against a hand-assembled reference.

Reference log-probs come from the model's own full forward (every response row with its own
copy of the prompt's image, positions computed by the model package), independent of the
trainer's forward (one vision pass per prompt, logits on the response only). The GRPO loss
and its derivative w.r.t. each token's log-prob are written out by hand in numpy; the
parameter gradient is that derivative pulled back through the reference forward (jax.vjp).
The step runs SGD with lr 1, no clipping, so -Delta params is exactly the gradient it used.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

import cpt_jax  # noqa: F401  (flax eager sharding off)
from cpt_jax import sharding
from cpt_jax.models import ModelConfig, init_from_config, prepare_inputs
from cpt_jax.rl import grpo, rollout
from cpt_jax.train import optim, rft

VOCAB = 64
GRID = (1, 4, 4)  # 16 patches -> 4 image tokens per prompt
N = 5  # response columns
G = 2  # responses per prompt
EPS_LOW, EPS_HIGH, DUAL, KL_COEF = 0.2, 0.3, 3.0, 0.1
CFG = grpo.GRPOConfig(n=G, eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip=DUAL, kl_coef=KL_COEF,
                      rollout_batch_size=8, update_batch_size=4)
ACCUM = 2  # micro-batches per optimiser step: 2 groups (4 rows) each


def sgd_config(**kw):
  c = ConfigDict(dict(name="sgd", lr=1.0, schedule="constant", warmup_ratio=0.0, b1=0.9,
                      b2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.0, grad_clip_norm=0.0,
                      grad_accum_steps=ACCUM, freeze=()))
  c.update(kw)
  return c


@pytest.fixture(scope="module")
def setup():
  # A 1-layer decoder and 1-block vision tower keep compilation short; every path is exercised.
  base = ModelConfig.tiny(vocab_size=VOCAB)
  config = dataclasses.replace(
      base, text=dataclasses.replace(base.text, num_layers=1),
      vision=dataclasses.replace(base.vision, depth=1, fullatt_block_indexes=(0,)))
  model = init_from_config(config, 0)
  # Larger weights than the 0.02 init, so log-probs differ visibly between tokens.
  model = jax.tree.map(lambda x: x * 8.0 if x.ndim == 2 else x, model)
  graphdef, params, _ = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  optimizer = optim.make_optimizer(sgd_config(), params, total_steps=100)
  trainer = rft.GRPOTrainer(graphdef, optimizer, CFG, config,
                            reference_params=jax.tree.map(jnp.copy, params))
  return dict(config=config, graphdef=graphdef, params=params, trainer=trainer,
              optimizer=optimizer)


def make_groups(config, num_groups: int, seed: int = 0) -> dict:
  """Left-padded prompts with one image each; responses of varied length, padded after EOS."""
  rng = np.random.default_rng(seed)
  eos, pad = config.eos_token_id[0], 0
  sp = 16
  ids = np.full((num_groups, sp), pad, np.int32)
  mask = np.zeros((num_groups, sp), np.int32)
  for b in range(num_groups):
    row = ([*rng.integers(1, 50, 1 + b % 3)] + [config.vision_start_token_id]
           + [config.image_token_id] * 4 + [config.vision_end_token_id]
           + [*rng.integers(1, 50, 2 + b % 4)])
    ids[b, sp - len(row):] = row
    mask[b, sp - len(row):] = 1
  lengths = rng.integers(1, N + 1, (num_groups, G))
  tokens = rng.integers(1, 50, (num_groups, G, N)).astype(np.int32)
  for b in range(num_groups):
    for j in range(G):
      tokens[b, j, lengths[b, j] - 1] = eos
      tokens[b, j, lengths[b, j]:] = pad
  rewards = rng.choice([0.0, 0.1, 0.9, 1.0], (num_groups, G)).astype(np.float32)
  rewards[:, 0] = 1.0 - rewards[:, 1] * 0.5  # no zero-variance group
  groups = dict(
      prompt_ids=ids, prompt_mask=mask,
      pixel_values=rng.normal(size=(num_groups * 16, config.vision.patch_dim)).astype(np.float32),
      image_grid_thw=np.tile(np.asarray(GRID, np.int32), (num_groups, 1)),
      answer=np.array(["x"] * num_groups), task=np.array(["t"] * num_groups),
      id=np.arange(num_groups).astype(str), tokens=tokens,
      policy_logprobs=np.zeros((num_groups, G, N), np.float32), lengths=lengths,
      done=np.ones((num_groups, G), bool), reward=rewards, accuracy=rewards.round(),
      format=np.zeros((num_groups, G), np.float32))
  return rollout.add_advantages(groups, CFG)


def reference_logprob_fn(setup):
  """The model's own forward on full rows, images repeated per response (jitted once)."""
  if "reference" in setup:
    return setup["reference"]
  config, graphdef = setup["config"], setup["graphdef"]

  @jax.jit
  def forward(params, ids, mask, pixels, positions, vision_inputs):
    model = nnx.merge(graphdef, nnx.State(params))
    logits = model(ids, mask, pixels, position_ids=positions, vision_inputs=vision_inputs)
    logp = jax.nn.log_softmax(logits[:, -N - 1:-1], axis=-1)
    return jnp.take_along_axis(logp, ids[:, -N:, None], axis=-1)[..., 0]  # [R, N]

  def prepare(groups):
    b = len(groups["prompt_ids"])
    ids = np.concatenate([np.repeat(groups["prompt_ids"], G, 0),
                          groups["tokens"].reshape(b * G, N)], 1)
    mask = np.concatenate([np.repeat(groups["prompt_mask"], G, 0),
                           (np.arange(N) < groups["lengths"].reshape(-1, 1)).astype(np.int32)], 1)
    pixels = np.repeat(groups["pixel_values"].reshape(b, 16, -1), G, 0).reshape(b * G * 16, -1)
    grids = np.repeat(groups["image_grid_thw"], G, 0)
    extra = prepare_inputs(config, ids, mask, grids)
    return (ids, mask, pixels, extra["position_ids"], extra["vision_inputs"]), mask[:, -N:]

  setup["reference"] = forward, prepare
  return forward, prepare


def hand_grpo(logp, old, ref, adv, mask):
  """Token-mean dual-clip PPO + KL(k3) by hand: (loss, d loss / d logp, clip fraction)."""
  ratio = np.exp(logp - old)
  a = adv[:, None]
  unclipped, clipped = -a * ratio, -a * np.clip(ratio, 1 - EPS_LOW, 1 + EPS_HIGH)
  pg = np.maximum(unclipped, clipped)
  grad = np.where(unclipped >= clipped, -a * ratio, 0.0)  # the clipped branch is constant
  capped = (a < 0) & (pg > -DUAL * a)
  pg = np.where(capped, -DUAL * a, pg)
  grad = np.where(capped, 0.0, grad)
  d = ref - logp
  kl = np.exp(d) - d - 1
  grad = grad + KL_COEF * (1 - np.exp(d))
  m = mask.astype(np.float64)
  total = m.sum()
  loss = ((pg + KL_COEF * kl) * m).sum() / total
  clip_frac = ((clipped > unclipped) * m).sum() / total
  return loss, grad * m / total, clip_frac


def fresh_state(setup):
  params = jax.tree.map(jnp.copy, setup["params"])
  return optim.create_train_state(params, setup["optimizer"], jax.random.PRNGKey(0))


def test_response_logprobs_equal_the_models_full_forward(setup):
  groups = make_groups(setup["config"], 2)  # a micro-batch's shape: the programs are reused
  forward, prepare = reference_logprob_fn(setup)
  args, mask = prepare(groups)
  expected = np.asarray(forward(setup["params"], *args))
  batch = rollout.training_batch(groups, setup["config"])
  got = np.asarray(setup["trainer"].logprob_fn(
      setup["params"], setup["trainer"].device_batch(batch)))
  np.testing.assert_allclose(got * mask, expected * mask, atol=2e-5)
  assert np.ptp(expected[mask == 1]) > 1.0  # log-probs vary: the comparison is not trivial


def test_step_loss_and_gradient_match_hand_reference(setup):
  """4 groups x 2 responses = one optimiser step of 2 accumulated micro-batches; pi_old and
  pi_ref are set so every branch of the clipped loss is hit."""
  trainer, config = setup["trainer"], setup["config"]
  groups = make_groups(config, 4)
  forward, prepare = reference_logprob_fn(setup)
  # Scored as the two micro-batches (2 groups each), so that one program serves all calls.
  halves = [prepare(rollout.take_rows(groups, rows, config)) for rows in ([0, 1], [2, 3])]
  mask = np.concatenate([m for _, m in halves])
  logp = np.concatenate([np.asarray(forward(setup["params"], *args), np.float64)
                         for args, _ in halves])  # [8, N]
  rng = np.random.default_rng(1)
  # log(pi / pi_old) in {-0.9, -0.3, 0, 0.2, 0.6, 1.4}: below, inside, above the clip range,
  # and beyond the dual clip (ratio 4 > 3) for negative advantages.
  old = logp - rng.choice([-0.9, -0.3, 0.0, 0.2, 0.6, 1.4], logp.shape)
  ref = logp + rng.normal(0, 0.3, logp.shape)
  adv = groups["advantages"].reshape(-1).astype(np.float64)
  r = groups["reward"]
  hand_adv = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(adv, hand_adv.reshape(-1), rtol=1e-6)
  loss, dloss_dlogp, clip_frac = hand_grpo(logp, old, ref, adv, mask)
  assert 0 < clip_frac < 0.8
  pulled = []
  for i, (args, _) in enumerate(halves):
    _, pullback = jax.vjp(lambda p, args=args: forward(p, *args), setup["params"])
    pulled.append(pullback(jnp.asarray(dloss_dlogp[4 * i:4 * i + 4], jnp.float32))[0])
  hand_grad = jax.tree.map(lambda a, b: a + b, *pulled)

  (micro,) = trainer.micro_batches_of(groups)
  assert len(micro) == ACCUM and all(len(m["response_ids"]) == 4 for m in micro)
  state = fresh_state(setup)
  losses, weights = [], []
  for i, batch in enumerate(micro):
    rows = slice(4 * i, 4 * i + 4)
    batch = dict(batch, old_logprobs=old[rows].astype(np.float32),
                 ref_logprobs=ref[rows].astype(np.float32))
    state, metrics = trainer.train_step(state, trainer.device_batch(batch))
    losses.append(float(metrics["loss"]))
    weights.append(mask[rows].sum())
    assert int(metrics["skipped"]) == 0
  np.testing.assert_allclose(np.dot(losses, weights) / np.sum(weights), loss, rtol=1e-4)
  step_grad = jax.tree.map(lambda before, after: before - after, setup["params"], state.params)
  flat_hand, flat_step = jax.tree.leaves(hand_grad), jax.tree.leaves(step_grad)
  scale = max(float(np.abs(g).max()) for g in flat_hand)
  assert scale > 1e-3
  for h, s in zip(flat_hand, flat_step):
    np.testing.assert_allclose(np.asarray(s), np.asarray(h), atol=1e-4 * scale)
  # The vision tower is trained too (its gradient sums over the responses sharing an image).
  assert float(np.abs(step_grad["visual"]["patch_embed"]["kernel"]).max()) > 0


def test_masked_tokens_do_not_matter(setup):
  """Prompt padding and response padding after EOS can hold anything."""
  trainer, config = setup["trainer"], setup["config"]
  groups = make_groups(config, 4)
  noisy = dict(groups)
  noisy["prompt_ids"] = np.where(groups["prompt_mask"] == 1, groups["prompt_ids"], 7)
  after_eos = np.arange(N) >= groups["lengths"][..., None]
  noisy["tokens"] = np.where(after_eos, 9, groups["tokens"])
  results = []
  for g in (groups, noisy):
    state = fresh_state(setup)
    for batch in trainer.micro_batches_of(g)[0]:
      batch = dict(batch, old_logprobs=np.zeros((4, N), np.float32),
                   ref_logprobs=np.zeros((4, N), np.float32))
      state, metrics = trainer.train_step(state, trainer.device_batch(batch))
    results.append((float(metrics["loss"]), state.params))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
  for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(results[1][1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_update_scores_pi_old_before_any_step_and_skips_nan(setup):
  """8 groups -> 2 optimiser steps: pi_old of the second step's rows is the pre-update policy
  (ratio != 1 there), while recomputation gives ratio exactly 1 where nothing changed yet."""
  trainer = setup["trainer"]
  groups = make_groups(setup["config"], 8, seed=3)
  state, metrics = trainer.update(fresh_state(setup), groups)
  assert metrics["optimizer_steps"] == 2 and metrics["reference_forwards"] == 4
  assert metrics["skipped"] == 0 and metrics["kl"] > 0
  # Micro-steps 1-2 see ratio 1 (SGD lr 1 changes the policy a lot before steps 3-4).
  assert abs(metrics["ratio_mean"] - 1.0) > 1e-3
  assert metrics["ppo_kl"] != 0.0

  bad = dict(groups, reward=groups["reward"].copy())
  bad["reward"][0, 0] = np.nan  # -> NaN advantages for group 0 (in micro-batch 1)
  bad = rollout.add_advantages(bad, CFG)
  before = fresh_state(setup)
  kept = jax.tree.map(np.asarray, before.params)
  after, metrics = trainer.update(before, bad)
  assert metrics["skipped"] == 1 and int(after.skipped) == 1
  assert int(after.step) == 4  # every micro-batch was consumed
  # The other micro-batch of that step and the whole second step still updated the weights.
  assert any(not np.array_equal(a, np.asarray(b))
             for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(after.params)))


class _Recorder:
  """Stands in for the jitted programs: records what the trainer feeds them."""

  def __init__(self):
    self.logprob_params, self.step_batches = [], []

  def logprob_fn(self, params, batch):
    self.logprob_params.append(params)
    return jnp.zeros(batch["response_mask"].shape, jnp.float32)

  def train_step(self, state, batch):
    self.step_batches.append(batch)
    return state, {"loss": jnp.float32(0), "grad_norm": jnp.float32(0), "skipped": 0,
                   "skipped_total": 0, "response_tokens": 0}


def test_kl_off_runs_no_reference_forward(setup):
  no_kl = dataclasses.replace(CFG, use_kl=False)
  with pytest.raises(ValueError, match="no reference is needed"):
    rft.GRPOTrainer(setup["graphdef"], setup["optimizer"], no_kl, setup["config"],
                    reference_params=setup["params"])
  with pytest.raises(ValueError, match="pass reference_params"):
    rft.GRPOTrainer(setup["graphdef"], setup["optimizer"], CFG, setup["config"])
  trainer = rft.GRPOTrainer(setup["graphdef"], setup["optimizer"], no_kl, setup["config"])
  recorder = _Recorder()
  trainer.logprob_fn, trainer.train_step = recorder.logprob_fn, recorder.train_step
  state = fresh_state(setup)
  _, metrics = trainer.update(state, make_groups(setup["config"], 8))
  assert metrics["reference_forwards"] == 0
  assert len(recorder.logprob_params) == 4  # pi_old only, once per micro-batch
  assert all(p is state.params for p in recorder.logprob_params)
  assert len(recorder.step_batches) == 4
  assert all("ref_logprobs" not in b for b in recorder.step_batches)


def test_take_rows_moves_each_prompts_images():
  config = ModelConfig.tiny(vocab_size=VOCAB)
  img = config.image_token_id
  # Row 0: one 4-token image; row 1: two images (4 and 8 tokens); row 2: no image.
  ids = np.array([[1, img, img, img, img] + [2] * 12,
                  [img] * 4 + [3] + [img] * 8 + [4] * 4,
                  [5] * 17], np.int32)
  grids = np.array([[1, 4, 4], [1, 4, 4], [1, 4, 8]], np.int32)
  pixels = np.arange(64, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  batch = dict(prompt_ids=ids, prompt_mask=np.ones_like(ids), pixel_values=pixels,
               image_grid_thw=grids, answer=np.array(["a", "b", "c"]),
               position_ids=np.zeros((3, 3, 17)))
  out = rollout.take_rows(batch, [1, 2, 0, 1], config)
  np.testing.assert_array_equal(out["answer"], ["b", "c", "a", "b"])
  np.testing.assert_array_equal(out["image_grid_thw"], grids[[1, 2, 0, 1, 2]])
  expected = np.concatenate([np.arange(16, 64), np.arange(0, 16), np.arange(16, 64)])
  np.testing.assert_array_equal(out["pixel_values"][:, 0], expected)
  assert "position_ids" not in out
  with pytest.raises(ValueError, match="do not match whole images"):
    rollout.take_rows(dict(batch, image_grid_thw=grids[[2, 0, 1]]), [0], config)


def test_training_batch_positions_generated_image_pads_as_text():
  config = ModelConfig.tiny(vocab_size=VOCAB)
  groups = make_groups(config, 2)
  groups["tokens"][0, 1, :2] = config.image_token_id  # the model "generated" image pads
  groups["lengths"][0, 1] = N
  batch = rollout.training_batch(groups, config)
  response = batch["response_position_ids"][:, 1]  # row 1 = group 0, response 1
  np.testing.assert_array_equal(response, response[:1].repeat(3, 0))  # text: equal rows
  np.testing.assert_array_equal(np.diff(response[0]), 1)
  # Each prompt once, positioned as a whole row's start: the image's 2 x 2 grid of positions.
  ids, mask = groups["prompt_ids"], groups["prompt_mask"]
  expected = prepare_inputs(config, ids, mask, groups["image_grid_thw"])["position_ids"]
  np.testing.assert_array_equal(batch["prompt_position_ids"], expected)
  assert response[0, 0] == expected[0, 0].max() + 1  # the response continues the prompt
  assert batch["response_ids"].shape == (2 * G, N) and batch["pixel_values"].shape[0] == 2 * 16


def test_sharded_forward_and_step_equal_single_device(setup):
  """On an 8-device mesh (prompts and responses split along the batch, weights over fsdp and
  tensor), the forward's log-probs and one optimiser step equal the single-device ones."""
  trainer, config = setup["trainer"], setup["config"]
  mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
  model = sharding.shard_model(
      nnx.merge(setup["graphdef"], nnx.State(jax.tree.map(jnp.copy, setup["params"]))), mesh)
  graphdef, params, _ = nnx.split(model, nnx.Param, ...)
  params = nnx.to_pure_dict(params)
  assert len(params["lm_head"].sharding.device_set) == 8
  sharded = rft.GRPOTrainer(graphdef, setup["optimizer"], CFG, config,
                            reference_params=jax.tree.map(jnp.copy, params), mesh=mesh)
  micro = trainer.micro_batches_of(make_groups(config, 4, seed=3))[0]
  zeros = np.zeros((4, N), np.float32)
  batches = [dict(m, old_logprobs=zeros, ref_logprobs=zeros) for m in micro]
  expected = np.asarray(trainer.logprob_fn(setup["params"], trainer.device_batch(batches[0])))
  state, state_sharded = fresh_state(setup), optim.create_train_state(
      params, setup["optimizer"], jax.random.PRNGKey(0))
  with sharded._context():
    got = np.asarray(sharded.logprob_fn(params, sharded.device_batch(batches[0])))
    for batch in batches:
      state_sharded, sharded_metrics = sharded.train_step(state_sharded,
                                                          sharded.device_batch(batch))
  for batch in batches:
    state, metrics = trainer.train_step(state, trainer.device_batch(batch))
  np.testing.assert_allclose(got, expected, atol=2e-5)
  assert float(sharded_metrics["loss"]) == pytest.approx(float(metrics["loss"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(state_sharded.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
