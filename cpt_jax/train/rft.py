"""Reinforcement fine-tuning with GRPO: the jitted step, the roles, and the RFT job.

    python -m cpt_jax.main --config=configs/rft_synthetic.py --workdir=/tmp/rft

Roles (as in Tunix), kept apart:
  actor      the trained float32 weights, inside `optim.TrainState` (donated to each step);
  reference  a frozen copy of the starting weights, same graphdef; only its log-probs are used
             (a separate jitted no-grad forward), and it does not exist when the KL term is off;
  rollout    `rl.sampler.Sampler`, given the actor's weights as a jit argument after every
             update (`GRPOTrainer.sync_rollout`): nothing recompiles; it reads the actor's own
             arrays when the compute dtype is float32, else a copy cast to the compute dtype.

One iteration (papers.md, "GRPO as the authors ran it"): sample n responses for each of
`rollout_batch_size` prompts, grade them, group-normalise the advantages, then take
rollout_batch_size / update_batch_size optimiser steps over mini-batches of whole groups
(`ppo_epochs` passes). pi_old, the policy that sampled, is scored before the first update of
the iteration by the same forward the loss uses (`old_logprobs='recompute'`, so the ratio is 1
up to float rounding at the first step) or taken from the sampler ('sampler': cached decoding,
which differs from the full forward by rounding).
"""
from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from cpt_jax import checkpoint as checkpoint_lib
from cpt_jax import models
from cpt_jax import sharding
from cpt_jax import writer as writer_lib
from cpt_jax.data import pipeline as pipeline_lib
from cpt_jax.models.qwen2_5_vl.model import last_real_hidden
from cpt_jax.rl import filtering, grpo, rewards, rollout
from cpt_jax.rl.sampler import Sampler
from cpt_jax.train import loop as loop_lib
from cpt_jax.train import optim
from cpt_jax.train.token_logprobs import token_logprobs

PyTree = Any
OLD_LOGPROBS = ("recompute", "sampler")
RIF_FILE = "rif_offline.json"
# Batch entries the policy forward and the loss read (the rest stays on the host).
DEVICE_KEYS = ("prompt_ids", "prompt_mask", "prompt_position_ids", "response_ids",
               "response_mask", "response_position_ids", "pixel_values", "vision_inputs",
               "advantages", "old_logprobs", "ref_logprobs", "loss_scale")
# What the policy forward reads (pi_old and pi_ref are scored from these alone).
FORWARD_KEYS = ("prompt_ids", "prompt_mask", "prompt_position_ids", "response_ids",
                "response_mask", "response_position_ids", "pixel_values", "vision_inputs")
# Batch dims for sharding: positions are [3, rows, length]; images and their metadata are
# whole-batch arrays, not split along the rows.
_BATCH_DIMS = {"prompt_position_ids": 1, "response_position_ids": 1, "pixel_values": None,
               "vision_inputs": None, "loss_scale": None}


# ------------------------------------------------------------------ policy forward


def response_logprobs(graphdef: nnx.GraphDef, params: PyTree, batch: dict, *,
                      loss_chunk: int = 0) -> jax.Array:
  """log pi(response token | prompt, earlier tokens) [R, N] (float32) for a
  `rollout.training_batch`.

  Plain log_softmax of the logits at temperature 1: the sampler's `policy_logprobs`
  convention. Each prompt and its images run once, into a KV cache that the prompt's R / B
  responses read as a shared prefix (`KVCache.fork`), so the prompt's tokens are neither
  repeated per response nor differentiated per response. The response is embedded as plain
  tokens, as the sampler's decode steps fed it, even where the model generated an image pad.
  Logits are computed for the response positions only.
  """
  model = nnx.merge(graphdef, nnx.State(params))
  lm = model.language_model
  prompt_ids, response_ids = batch["prompt_ids"], batch["response_ids"]
  (prompts, prompt_len), (rows, new_tokens) = prompt_ids.shape, response_ids.shape
  x, mask, positions = model.embed(
      prompt_ids, batch["prompt_mask"], batch.get("pixel_values"),
      position_ids=batch["prompt_position_ids"], vision_inputs=batch.get("vision_inputs"))
  hidden, cache = lm(x, positions, mask, model.init_cache(prompts, prompt_len, x.dtype))
  last_hidden = last_real_hidden(hidden, mask)[:, None]  # [B, 1, D]
  own, _ = lm(lm.embed(response_ids), batch["response_position_ids"], batch["response_mask"],
              cache.fork(rows // prompts, new_tokens))
  # The prompt's last token predicts response token 0; response token t predicts t + 1.
  hidden = jnp.concatenate([jnp.repeat(last_hidden, rows // prompts, axis=0), own[:, :-1]], 1)
  logprobs, _ = token_logprobs(hidden, model.head_kernel(), response_ids, chunk=loss_chunk)
  return logprobs


def make_logprob_fn(graphdef: nnx.GraphDef, *, compute_dtype=None,
                    loss_chunk: int = 0) -> Callable:
  """jit((params, batch) -> response log-probs [R, N]): the no-grad forward of pi_old / pi_ref."""
  def logprobs(params, batch):
    return response_logprobs(graphdef, optim.cast_floating(params, compute_dtype), batch,
                             loss_chunk=loss_chunk)
  return jax.jit(logprobs)


def make_rollout_cast(compute_dtype, param_shardings: PyTree | None = None) -> Callable:
  """jit(params -> a copy in the compute dtype, laid out like the params).

  The sampler and the reference get their weights this way: a fixed layout means the
  sampler's programs compile once (jit specialises on input shardings), and the copy
  survives the donation of the actor's state.
  """
  return jax.jit(lambda params: optim.cast_floating(params, compute_dtype),
                 out_shardings=param_shardings)


def make_grpo_step(graphdef: nnx.GraphDef, optimizer: optim.Optimizer, cfg: grpo.GRPOConfig, *,
                   compute_dtype=None, remat_policy: str | None = None,
                   state_sharding: PyTree | None = None, loss_chunk: int = 0) -> Callable:
  """jit(step)(state, batch) -> (state, metrics); `state` is donated.

  batch: `rollout.training_batch` rows plus old_logprobs [R, N], ref_logprobs [R, N] (absent
  when the KL term is off: the step then never reads a reference), advantages [R] and
  loss_scale [] (this micro-batch's share of the optimiser step, times the accumulation
  count, so that optax.MultiSteps' mean of micro-gradients is the gradient of the loss over
  the whole update batch). A non-finite loss or gradient (e.g. a NaN advantage) skips the
  update (`optim.apply_gradients_or_skip`).
  """
  def loss_of_params(params, batch):
    logp = response_logprobs(graphdef, optim.cast_floating(params, compute_dtype), batch,
                             loss_chunk=loss_chunk)
    loss, metrics = grpo.policy_loss(logp, batch["old_logprobs"], batch.get("ref_logprobs"),
                                     batch["advantages"], batch["response_mask"], cfg)
    return loss * batch["loss_scale"], (loss, metrics)

  loss_of_params = optim.with_remat(loss_of_params, remat_policy)

  def step(state: optim.TrainState, batch: dict):
    (scaled, (loss, metrics)), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
        state.params, batch)
    state, info = optim.apply_gradients_or_skip(state, grads, scaled, optimizer)
    if state_sharding is not None:
      state = jax.lax.with_sharding_constraint(state, state_sharding)
    return state, {"loss": loss, **metrics, **info,
                   "response_tokens": batch["response_mask"].sum()}

  return jax.jit(step, donate_argnums=0)


# ------------------------------------------------------------------ roles


class GRPOTrainer:
  """Actor update, frozen reference and rollout weights for one GRPO run.

  Args:
    graphdef: the model's graph (params are pure dicts, as in `optim.TrainState`).
    optimizer: `optim.make_optimizer(...)`; its grad_accum_steps is the micro-batch count.
    cfg: the GRPO hyper-parameters (loss, batch sizes, ppo_epochs).
    model_config: the model's ModelConfig (image token ids for the row layout).
    reference_params: the frozen reference weights; must be None when cfg's KL term is off.
    sampler: the rollout role (optional: tests may drive updates with hand-made groups).
    old_logprobs: 'recompute' or 'sampler' (module docstring).
    compute_dtype, remat_policy, loss_chunk: as in the SFT step.
    mesh, rules, state_sharding: run the jitted programs sharded (None: single device).
  """

  def __init__(self, graphdef: nnx.GraphDef, optimizer: optim.Optimizer, cfg: grpo.GRPOConfig,
               model_config, *, reference_params: PyTree | None = None,
               sampler: Sampler | None = None, old_logprobs: str = "recompute",
               compute_dtype=None, remat_policy: str | None = None, mesh=None, rules=None,
               state_sharding: PyTree | None = None, pad_id: int = 0, loss_chunk: int = 0):
    if old_logprobs not in OLD_LOGPROBS:
      raise ValueError(f"old_logprobs must be one of {OLD_LOGPROBS}, got {old_logprobs!r}")
    if cfg.kl_enabled and reference_params is None:
      raise ValueError("the KL term is on (use_kl and kl_coef > 0): pass reference_params")
    if not cfg.kl_enabled and reference_params is not None:
      raise ValueError("the KL term is off: no reference is needed (pass reference_params=None)")
    self.graphdef = graphdef
    self.optimizer = optimizer
    self.cfg = cfg
    self.model_config = model_config
    self.reference_params = reference_params
    self.sampler = sampler
    self.old_logprobs = old_logprobs
    self.compute_dtype = compute_dtype
    self.mesh, self.rules = mesh, rules
    self.pad_id = pad_id
    self.micro_batches = optimizer.accum_steps
    self.train_step = make_grpo_step(graphdef, optimizer, cfg, compute_dtype=compute_dtype,
                                     remat_policy=remat_policy, state_sharding=state_sharding,
                                     loss_chunk=loss_chunk)
    self.logprob_fn = make_logprob_fn(graphdef, compute_dtype=compute_dtype,
                                      loss_chunk=loss_chunk)
    self.rollout_weights = make_rollout_cast(
        compute_dtype, None if state_sharding is None else state_sharding.params)

  # ---------------------------------------------------------------- rollout role

  def sync_rollout(self, params: PyTree) -> None:
    """Points the sampler at `params` (cast to the compute dtype); nothing recompiles.

    Without a cast (and with the sampler's weight_layout 'in_out') the sampler reads the actor's
    arrays, which the next update donates: sync again after every update before sampling.
    """
    if self.sampler is None:
      raise ValueError("this trainer has no sampler")
    needs_cast = self.compute_dtype is not None and any(
        jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != self.compute_dtype
        for x in jax.tree.leaves(params))
    weights = self.rollout_weights(params) if needs_cast else params
    self.sampler.update_weights(nnx.merge(self.graphdef, nnx.State(weights)))

  # ---------------------------------------------------------------- actor update

  def _context(self):
    if self.mesh is None:
      return contextlib.nullcontext()
    return sharding.use_mesh(self.mesh, self.rules)

  def device_batch(self, batch: dict) -> dict:
    """The device part of a host training batch; arrays already on the devices stay put."""
    host = {k: v for k, v in batch.items()
            if k in DEVICE_KEYS and v is not None and not isinstance(v, jax.Array)}
    if self.mesh is None:
      host = jax.tree.map(jnp.asarray, host)
    else:
      host = sharding.shard_batch(host, self.mesh, batch_dims=_BATCH_DIMS, rules=self.rules)
    on_device = {k: v for k, v in batch.items() if k in DEVICE_KEYS and isinstance(v, jax.Array)}
    return {**on_device, **host}

  def micro_batches_of(self, groups: dict) -> list[list[dict]]:
    """Host training batches per optimiser step (lists of micro-batches) of a group batch."""
    num_groups = len(groups["prompt_ids"])
    update_groups = self.cfg.update_batch_size
    if num_groups % update_groups:
      raise ValueError(f"{num_groups} groups is not a multiple of update_batch_size "
                       f"{update_groups}")
    steps = []
    for step in rollout.minibatch_groups(num_groups, update_groups, self.micro_batches):
      micro = [rollout.training_batch(rollout.take_rows(groups, rows, self.model_config),
                                      self.model_config, self.pad_id) for rows in step]
      weights = [self._loss_weight(m) for m in micro]
      total = sum(weights)
      for m, w in zip(micro, weights):
        # MultiSteps averages micro-gradients: scale each by its share times their number.
        m["loss_scale"] = np.float32(len(micro) * w / total if total > 0 else 1.0)
      steps.append(micro)
    return steps

  def _loss_weight(self, batch: dict) -> float:
    """What the loss averages over in this micro-batch: tokens or responses (cfg.loss_agg)."""
    counts = batch["response_mask"].sum(axis=1)
    if self.cfg.loss_agg == "token_mean":
      return float(counts.sum())
    return float((counts > 0).sum())

  def update(self, state: optim.TrainState, groups: dict) -> tuple[optim.TrainState, dict]:
    """One iteration's updates from graded groups (with advantages); returns metrics.

    Metrics: the step's (means over micro-steps; grad_norm_max), skipped updates,
    reference_forwards, sampler_logprob_gap (with 'recompute': the largest |log pi_old| gap
    between the full forward and the sampler on response tokens, float rounding if consistent)
    and timings in seconds: time/old_logprobs, time/reference, time/update.
    """
    steps = self.micro_batches_of(groups)
    timings = {"time/old_logprobs": 0.0, "time/reference": 0.0}
    reference_forwards = 0
    sampler_gap = 0.0
    with self._context():
      # Score pi_old and pi_ref for every micro-batch before the first update changes the actor.
      for micro in steps:
        for batch in micro:
          device = self.device_batch({k: v for k, v in batch.items() if k in FORWARD_KEYS})
          if self.old_logprobs == "recompute":
            t = time.perf_counter()
            batch["old_logprobs"] = jax.block_until_ready(self.logprob_fn(state.params, device))
            timings["time/old_logprobs"] += time.perf_counter() - t
            # The full forward and the sampler's cached decoding score the same tokens.
            gap = np.abs(np.asarray(batch["old_logprobs"]) - batch["sampler_logprobs"])
            sampler_gap = max(sampler_gap, float((gap * batch["response_mask"]).max()))
          else:
            batch["old_logprobs"] = batch["sampler_logprobs"]
          if self.reference_params is not None:
            t = time.perf_counter()
            batch["ref_logprobs"] = jax.block_until_ready(
                self.logprob_fn(self.reference_params, device))
            timings["time/reference"] += time.perf_counter() - t
            reference_forwards += 1
      t = time.perf_counter()
      history = []
      for _ in range(self.cfg.ppo_epochs):
        for micro in steps:
          for batch in micro:
            state, metrics = self.train_step(state, self.device_batch(batch))
            history.append(metrics)
      history = jax.device_get(history)
    timings["time/update"] = time.perf_counter() - t
    out = {k: float(np.mean([h[k] for h in history])) for k in history[0]
           if k not in ("skipped", "skipped_total", "response_tokens")}
    out["grad_norm_max"] = float(max(h["grad_norm"] for h in history))
    out["skipped"] = int(sum(int(h["skipped"]) for h in history))
    out["skipped_total"] = int(history[-1]["skipped_total"])
    out["optimizer_steps"] = len(steps) * self.cfg.ppo_epochs
    out["reference_forwards"] = reference_forwards
    if self.old_logprobs == "recompute":
      out["sampler_logprob_gap"] = sampler_gap
    return state, {**out, **timings}

  def iterate(self, state: optim.TrainState, iteration: int, next_batch: Callable[[], dict],
              sample: Callable[[dict, jax.Array], dict], *, filter_mode: str, low: float,
              high: float, max_batches: int | None) -> tuple[optim.TrainState, dict]:
    """One GRPO iteration: rollouts of prompt batches from `next_batch()` by
    `sample(batch, key)` (keys fold_in(fold_in(state.rng, iteration), draw): a resumed run
    draws the same ones), collected to cfg.rollout_batch_size prompts through the
    `filter_mode` filter (rl.rollout.collect_groups), advantages, `update`, and the rollout
    weights synced. Metrics: the update's, the groups' reward statistics, the filter's, times."""
    t0 = time.perf_counter()
    key = jax.random.fold_in(state.rng, iteration)
    draws = itertools.count()

    def next_groups():
      return sample(next_batch(), jax.random.fold_in(key, next(draws)))

    groups, filter_stats = rollout.collect_groups(
        next_groups, target=self.cfg.rollout_batch_size, mode=filter_mode, low=low, high=high,
        max_batches=max_batches, pad_id=self.pad_id, model_config=self.model_config)
    t_rollout = time.perf_counter() - t0
    groups = rollout.add_advantages(groups, self.cfg)
    state, metrics = self.update(state, groups)
    self.sync_rollout(state.params)
    metrics.update(rollout.group_stats(groups))
    metrics.update(filter_stats)
    metrics["time/rollout"] = t_rollout
    metrics["time/iteration"] = time.perf_counter() - t0
    return state, metrics


# ------------------------------------------------------------------ the RFT job


def grpo_config(config) -> grpo.GRPOConfig:
  """GRPOConfig from `config.rl`; the optimiser fields come from `config.optim`."""
  rl = dict(config.rl)
  for key in ("old_logprobs", "top_k", "cache_growth"):
    rl.pop(key)
  rl["dual_clip"] = rl["dual_clip"] if rl["dual_clip"] > 0 else None  # 0 turns it off
  return grpo.GRPOConfig(**rl, max_prompt_length=config.data.max_len, lr=config.optim.lr,
                         weight_decay=config.optim.weight_decay,
                         grad_clip=config.optim.grad_clip_norm or 0.0)


def run(config, workdir: str) -> dict[str, Any]:
  """RFT of `config` in `workdir` (resuming from its latest checkpoint); returns final metrics.

  Initialisation: a checkpoint in the workdir (resume) > `init.workdir` (the final weights of
  an SFT or RFT run; its tokenizer too) > `model.pretrained` > random init.
  """
  if jax.process_count() > 1:
    raise ValueError("the RFT job runs in one process (rollout batches are assembled on one "
                     "host); multi-process RFT is not implemented")
  os.makedirs(workdir, exist_ok=True)
  # The SFT job's helpers (loop_lib): both jobs agree on tokenizer, model and initial weights.
  compute_dtype = loop_lib.parse_dtype(config.compute_dtype)
  cfg = grpo_config(config)
  rif_mode = filtering.FilterMode.parse(config.rif.mode)

  # ---------------------------------------------------------------- mesh
  mesh, rules = sharding.mesh_from_config(config.mesh)
  logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.default_backend())

  # ---------------------------------------------------------------- tokenizer, data
  data_dir = config.data.dir or os.path.join(workdir, "data")
  if config.data.kind == "synthetic":
    from cpt_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    synthetic.build_synthetic(data_dir, config.data.tasks, **config.data.synthetic)
  train_sources = pipeline_lib.open_sources(data_dir, config.data.tasks, "train",
                                            config.data.kind)
  init_dir = config.init.workdir
  init_tokenizer = os.path.join(init_dir, "tokenizer") if init_dir else ""
  if init_tokenizer and not config.tokenizer.path and os.path.isdir(init_tokenizer):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.tokenizer.path = init_tokenizer
  tokenizer = loop_lib.make_tokenizer(config, workdir, train_sources)
  model_config = loop_lib.make_model_config(config, tokenizer)
  eos_ids = tuple(model_config.eos_token_id)
  pad_id = tokenizer.pad_token_id

  def prompts(sources, *, batch_size, train):
    return pipeline_lib.Pipeline(sources, tokenizer, _prompt_data_config(
        config, batch_size=batch_size, train=train))

  # ---------------------------------------------------------------- model, roles
  # Abstract first: a resumed run never builds (or loads) weights it then overwrites.
  graphdef, abstract_params, param_sh = loop_lib.abstract_model_params(
      lambda: models.Qwen2_5_VL(model_config, dtype=compute_dtype, param_dtype=jnp.float32,
                                rngs=nnx.Rngs(config.seed)), mesh, rules)
  num_iterations = config.num_iterations  # refined after the offline filter below
  micro_steps_per_iteration = (cfg.rollout_batch_size // cfg.update_batch_size
                               * cfg.ppo_epochs * config.optim.grad_accum_steps)

  def initial_params():
    """The weights RFT starts from (also the reference): init workdir, pretrained or random."""
    if init_dir:
      return checkpoint_lib.restore_params(os.path.join(init_dir, "checkpoints"),
                                           abstract_params)
    return loop_lib.split_params(
        loop_lib.build_model(config, model_config, compute_dtype, mesh, rules))[1]

  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     max_to_keep=config.ckpt.keep,
                                     async_save=config.ckpt.async_save)
  params = initial_params()
  frozen_copy = make_rollout_cast(compute_dtype, param_sh)
  # The reference is only ever used in the compute dtype: keep it so (half the memory in bf16).
  reference = frozen_copy(params) if cfg.kl_enabled else None
  sampler = Sampler(nnx.merge(graphdef, nnx.State(frozen_copy(params))),
                    max_new_tokens=cfg.max_response_length, eos_ids=eos_ids, pad_id=pad_id,
                    prompt_buckets=_data_buckets(config), mesh=mesh, rules=rules,
                    cache_growth=config.rl.cache_growth or None)
  sample_key = jax.random.PRNGKey(config.seed + 1)

  def sample(batch, key, **kw):
    return rollout.sample_groups(sampler, batch, key=key, cfg=cfg, tokenizer=tokenizer,
                                 top_k=config.rl.top_k or None, **kw)

  # ---------------------------------------------------------------- offline RIF-RFT
  rif_stats: dict[str, Any] = {}
  if rif_mode == filtering.FilterMode.OFFLINE:
    train_sources, rif_stats = rollout.offline_rif_sources(
        os.path.join(workdir, RIF_FILE), train_sources, lambda: rollout.offline_filter(
            lambda batch: sample(batch, sample_key),
            prompts(train_sources, batch_size=cfg.rollout_batch_size, train=False),
            batch_size=cfg.rollout_batch_size, model_config=model_config,
            drop_all_wrong=config.rif.drop_all_wrong, drop_all_right=config.rif.drop_all_right))
    logging.info("offline RIF-RFT kept %d of %d instances (%.3f)", rif_stats["num_kept"],
                 rif_stats["num_instances"], rif_stats["kept_fraction"])
  num_examples = sum(len(ts.source) for ts in train_sources)
  if not num_iterations:
    num_iterations = max(1, math.ceil(config.num_epochs * num_examples / cfg.rollout_batch_size))
  train_iter = iter(prompts(train_sources, batch_size=cfg.rollout_batch_size, train=True))

  # ---------------------------------------------------------------- actor state, restore
  optimizer = optim.make_optimizer(config.optim, abstract_params,
                                   max(1, num_iterations * micro_steps_per_iteration
                                       // config.optim.grad_accum_steps))

  def init_state(p):
    return optim.create_train_state(p, optimizer, jax.random.PRNGKey(config.seed))
  abstract_state, state_sh = loop_lib.abstract_train_state(init_state, abstract_params, param_sh,
                                                           mesh)
  restored = ckpt.restore_latest(abstract_state, data_iter=train_iter)
  if restored is not None:
    state, _ = restored
    iteration = int(ckpt.latest_step())
    del params
    logging.info("resumed at iteration %d", iteration)
  else:
    state = jax.jit(init_state, out_shardings=state_sh, donate_argnums=0)(params)
    iteration = 0
  trainer = GRPOTrainer(graphdef, optimizer, cfg, model_config, reference_params=reference,
                        sampler=sampler, old_logprobs=config.rl.old_logprobs,
                        compute_dtype=compute_dtype, remat_policy=config.remat_policy or None,
                        mesh=mesh, rules=rules, state_sharding=state_sh, pad_id=pad_id,
                        loss_chunk=config.loss_chunk)
  trainer.sync_rollout(state.params)

  # ---------------------------------------------------------------- evaluation
  eval_tasks = tuple(config.eval.tasks) or tuple(config.data.tasks)

  def evaluate() -> dict[str, float]:
    """Decoded answers on the test prompts: accuracy (extract_answer + answers_match), the
    format score and the reward, per task, averaged over `eval.num_samples` answers a prompt."""
    sources = pipeline_lib.open_sources(data_dir, eval_tasks, config.eval.split, config.data.kind)
    key = jax.random.PRNGKey(config.seed + 2)
    num_samples = config.eval.num_samples
    scores: dict[str, list] = {"accuracy": [], "format": [], "reward": [], "task": []}
    seen = 0
    for batch in prompts(sources, batch_size=config.eval.batch_size, train=False):
      padded, real = rollout.pad_rows(batch, config.eval.batch_size, model_config)
      groups = sample(padded, key, num_samples=num_samples,
                      temperature=config.rl.eval_temperature)
      for i in range(real):
        task = str(batch["task"][i])
        scores["accuracy"].append(np.mean([rewards.answers_match(
            rewards.extract_answer(response, task), batch["answer"][i])
            for response in groups["response"][i]]))
        scores["format"].append(groups["format"][i].mean())
        scores["reward"].append(groups["reward"][i].mean())
        scores["task"].append(task)
      seen += real
      if config.eval.max_examples and seen >= config.eval.max_examples:
        break
    task = np.asarray(scores["task"])
    out = {}
    for name in sorted(set(task)) + ["all"]:
      sel = (task == name) if name != "all" else np.ones(len(task), bool)
      for metric in ("accuracy", "format", "reward"):
        out[f"eval/{name}/{metric}"] = float(np.mean(np.asarray(scores[metric])[sel]))
    return out

  # ---------------------------------------------------------------- loop
  writer = writer_lib.MetricWriter(workdir, config=config, total_steps=num_iterations,
                                   start_step=iteration)
  writer.log("RFT iterations %d to %d (%d prompts x %d responses each; RIF %s)", iteration,
             num_iterations, cfg.rollout_batch_size, cfg.n, rif_mode.value)
  if rif_stats:
    writer.write(iteration, {f"rif/{k}": v for k, v in rif_stats.items()
                             if isinstance(v, (int, float))})
  final: dict[str, Any] = {}
  if config.eval.at_start and iteration == 0:
    final.update({f"{k}_start": v for k, v in evaluate().items()})
    writer.write(0, final)
  preempted = False
  while iteration < num_iterations:
    state, metrics = trainer.iterate(
        state, iteration, lambda: next(train_iter), sample, filter_mode=rif_mode.value,
        low=config.rif.low, high=config.rif.high, max_batches=config.rif.max_batches or None)
    iteration += 1
    if metrics["skipped"]:
      writer.log("iteration %d: %d non-finite updates skipped", iteration, metrics["skipped"])
    if iteration % config.log_every == 0 or iteration == num_iterations:
      writer.write(iteration, metrics)
    final.update(metrics)
    if ckpt.reached_preemption(iteration):
      preempted = True
    if config.eval.every and iteration % config.eval.every == 0 and iteration < num_iterations:
      writer.write(iteration, evaluate())
    if preempted or iteration == num_iterations or iteration % config.ckpt.every == 0:
      ckpt.save(iteration, state, data_iter=train_iter, force=True,
                metadata={"num_iterations": num_iterations, "rif": rif_stats})
    if preempted:
      writer.log("preempted: saved iteration %d, stopping", iteration)
      break
  if not preempted:
    eval_metrics = evaluate()
    writer.write(iteration, eval_metrics)
    final.update(eval_metrics)
  ckpt.wait()
  ckpt.close()
  writer.close()
  return {**final, **{f"rif/{k}": v for k, v in rif_stats.items() if isinstance(v, (int, float))},
          "iteration": iteration, "preempted": preempted}


def _data_buckets(config) -> tuple[int, ...]:
  return tuple(sorted(set(config.data.length_buckets) | {config.data.max_len}))


def _prompt_data_config(config, *, batch_size: int, train: bool) -> pipeline_lib.DataConfig:
  d = config.data
  return pipeline_lib.DataConfig(
      product="prompt", prompt_style=d.prompt_style, batch_size=batch_size,
      max_len=d.max_len, length_buckets=tuple(d.length_buckets), seed=config.seed,
      shuffle=train, num_epochs=None if train else 1,
      drop_remainder=train,  # evaluation and the offline filter pad their last batch
      min_pixels=d.min_pixels, max_pixels=d.max_pixels,
      fixed_size=tuple(d.fixed_size) if d.fixed_size else None,
      num_workers=d.num_workers, on_bad_example=d.on_bad_example)

