"""ParetoCL for continual post-training of the VLM (issue #8, beyond the paper).

A preference alpha = (alpha_replay, alpha_new) on the 2-simplex conditions a low-rank update
of the LM head:

    logits(h, alpha) = head(h) + ((h A) * s(alpha)) B,      A [D, r], B [r, V], s [r]

where s(alpha) comes from the classic ParetoCL hypernetwork (`hypernet.PreferenceHypernet`:
2 -> hidden -> hidden -> r). B starts at zero, so at initialisation every alpha gives the base
model's logits (like LoRA). `ParetoVLM` wraps the model by composition; its parameters are
`base/...` (the Qwen2.5-VL weights) and `adapter/...`, so `optim.freeze=('base',)` trains the
adapter only.

Training (`make_train_step`): one backbone pass over the concatenation of the new-task batch
and the replay batch (`concat_batches`), K preferences from Dirichlet(1, 1) per step, and
    loss = mean_k [alpha_k,replay L_replay(alpha_k) + alpha_k,new L_new(alpha_k)]
with the answer-token cross-entropy of `train.sft.loss_fn`. The K heads are applied one after
another (`lax.map`), so memory holds one [B, S, V] logits array at a time, not K.

The continual loop's method 'paretocl' (cpt_jax/cl/loop.py) trains with `build` and
`make_train_step` and decodes with `make_prompt_select_step` + `fold_preference`.

Inference (`make_predict_step`): K fixed preferences (seeded), per sample the one whose
answer distribution has the least entropy. `entropy='first_token'` (default) scores the
next-token distribution at the last prompt position (the first answer token a decoder would
emit; it uses no part of the answer), `entropy='teacher_forced'` the mean entropy over all
answer positions with the reference answer fed in (uses the reference answer's prefix; a proxy
like `sft.make_eval_step`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax import models
from cpt_jax.paretocl import hypernet
from cpt_jax.train import optim, sft

PyTree = Any
ENTROPY_MODES = ("first_token", "teacher_forced")


class PreferenceLowRankHead(nnx.Module):
  """The preference-conditioned low-rank update ((h A) * s(alpha)) B of the LM head."""

  def __init__(self, hidden_size: int, vocab_size: int, *, rank: int = 8, hyper_hidden: int = 100,
               rngs: nnx.Rngs):
    if rank < 1:
      raise ValueError(f"rank must be >= 1, got {rank}")
    self.hypernet = hypernet.PreferenceHypernet({"scales": (rank,)}, num_objectives=2,
                                                hidden=hyper_hidden, num_hidden_layers=2, rngs=rngs)
    self.down = nnx.Param(
        jax.random.normal(rngs.params(), (hidden_size, rank)) / np.sqrt(hidden_size))  # A
    self.up = nnx.Param(jnp.zeros((rank, vocab_size)))  # B: zero, so alpha has no effect at init

  def scales(self, alphas: jax.Array) -> jax.Array:
    """alphas [..., 2] -> per-rank scales [..., r]."""
    return self.hypernet(alphas)["scales"]

  def delta(self, hidden: jax.Array, scales: jax.Array) -> jax.Array:
    """hidden [B, S, D], scales [r] or per-row [B, r] -> logit update [B, S, V] (float32)."""
    if scales.ndim == 2:
      scales = scales[:, None, :]  # [B, 1, r]
    low = jnp.dot(hidden, self.down[...].astype(hidden.dtype),
                  preferred_element_type=jnp.float32)  # [B, S, r]
    return jnp.dot(low * scales, self.up[...])


class ParetoVLM(nnx.Module):
  """Qwen2.5-VL (or text-only Qwen2) with a preference-conditioned low-rank LM-head update."""

  def __init__(self, base: models.Qwen2_5_VL, *, rank: int = 8, hyper_hidden: int = 100,
               rngs: nnx.Rngs):
    self.base = base
    self.config = base.config
    self.adapter = PreferenceLowRankHead(base.config.text.hidden_size, base.config.text.vocab_size,
                                         rank=rank, hyper_hidden=hyper_hidden, rngs=rngs)

  def hidden_states(self, input_ids, **model_kwargs) -> jax.Array:
    return self.base.hidden_states(input_ids, **model_kwargs)

  def logits(self, hidden: jax.Array, alpha: jax.Array) -> jax.Array:
    """hidden [B, S, D], alpha [2] (one for all rows) or [B, 2] -> logits [B, S, V]."""
    return self.base.logits(hidden) + self.adapter.delta(hidden, self.adapter.scales(alpha))

  def __call__(self, input_ids, alphas: jax.Array, **model_kwargs) -> jax.Array:
    """input_ids [B, S], alphas [K, 2] -> logits [K, B, S, V] (one backbone pass)."""
    hidden = self.hidden_states(input_ids, **model_kwargs)
    base_logits = self.base.logits(hidden)
    return jax.vmap(lambda s: base_logits + self.adapter.delta(hidden, s))(
        self.adapter.scales(alphas))


def concat_batches(model_config: models.ModelConfig, new: dict, replay: dict) -> dict:
  """One host batch of the new-task rows followed by the replay rows (SFT batch contract),
  right-padded to a common length, with `is_new` int32 [B] marking the new rows and M-RoPE
  positions / vision inputs recomputed for the joint batch."""
  for name, b in (("new", new), ("replay", replay)):
    missing = [k for k in ("input_ids", "attention_mask", "loss_mask") if k not in b]
    if missing:
      raise ValueError(f"{name} batch lacks {missing}; it has {sorted(b)}")
  length = max(new["input_ids"].shape[1], replay["input_ids"].shape[1])

  def cat(key):
    rows = [np.pad(np.asarray(b[key]), ((0, 0), (0, length - b[key].shape[1])))
            for b in (new, replay)]
    return np.concatenate(rows).astype(np.int32)

  out = {k: cat(k) for k in ("input_ids", "attention_mask", "loss_mask")}
  out["is_new"] = np.concatenate([np.ones(len(new["input_ids"]), np.int32),
                                  np.zeros(len(replay["input_ids"]), np.int32)])
  grids = [np.asarray(b["image_grid_thw"]).reshape(-1, 3) for b in (new, replay)
           if b.get("image_grid_thw") is not None]
  grid = np.concatenate(grids).astype(np.int32) if grids else np.zeros((0, 3), np.int32)
  if len(grid):
    out["pixel_values"] = np.concatenate(
        [np.asarray(b["pixel_values"]) for b in (new, replay)
         if b.get("pixel_values") is not None and len(b["pixel_values"])])
  out["image_grid_thw"] = grid
  prepared = models.prepare_inputs(model_config, out["input_ids"], out["attention_mask"],
                                   grid if len(grid) else None)
  out["position_ids"] = prepared["position_ids"]
  if len(grid):
    out["vision_inputs"] = prepared["vision_inputs"]
  if "task" in new and "task" in replay:
    out["task"] = np.concatenate([np.asarray(new["task"]), np.asarray(replay["task"])])
  return out


def device_batch(batch: dict) -> dict:
  """The device part of a `concat_batches` batch (`sft.device_batch` plus `is_new`)."""
  if "is_new" not in batch:
    raise ValueError(f"ParetoCL batch lacks 'is_new' (build it with concat_batches); it has "
                     f"{sorted(batch)}")
  return {**sft.device_batch(batch), "is_new": batch["is_new"]}


def _model_kwargs(batch: dict) -> dict:
  return {k: batch[k] for k in sft.MODEL_KWARGS if k in batch}


def paretocl_loss(graphdef: nnx.GraphDef, params: PyTree, batch: dict,
                  alphas: jax.Array) -> tuple[jax.Array, dict]:
  """mean_k [alpha_k,replay L_replay(alpha_k) + alpha_k,new L_new(alpha_k)] on a device batch.

  alphas [K, 2] ordered (replay, new). L_new / L_replay are `sft.loss_fn` on the rows with
  is_new = 1 / 0 (token means; a side without answer tokens contributes 0).
  """
  model = nnx.merge(graphdef, nnx.State(params))
  hidden = model.hidden_states(batch["input_ids"], **_model_kwargs(batch))  # [B, S, D]
  base_logits = model.base.logits(hidden)  # [B, S, V]
  is_new = batch["is_new"][:, None].astype(batch["loss_mask"].dtype)  # [B, 1]
  mask_new, mask_replay = batch["loss_mask"] * is_new, batch["loss_mask"] * (1 - is_new)

  def losses(alpha):  # one preference at a time: one [B, S, V] logits array in memory
    logits = base_logits + model.adapter.delta(hidden, model.adapter.scales(alpha))
    loss_new, _ = sft.loss_fn(logits, batch["input_ids"], mask_new)
    loss_replay, _ = sft.loss_fn(logits, batch["input_ids"], mask_replay)
    return loss_new, loss_replay

  loss_new, loss_replay = jax.lax.map(losses, alphas)  # [K] each
  loss = jnp.mean(alphas[:, 0] * loss_replay + alphas[:, 1] * loss_new)
  return loss, {"loss_new": jnp.mean(loss_new), "loss_replay": jnp.mean(loss_replay)}


def make_train_step(graphdef: nnx.GraphDef, optimizer: optim.Optimizer, *,
                    num_preferences: int = 5, concentration: float = 1.0,
                    compute_dtype=None, remat_policy: str | None = None,
                    state_sharding: PyTree | None = None) -> Callable:
  """jit(step)(state, batch) -> (state, metrics); `state` (optim.TrainState of the ParetoVLM's
  pure params) is donated. Preferences come from `state.rng`, which the step advances.
  remat_policy and state_sharding: as in `sft.make_train_step`."""
  if num_preferences < 1:
    raise ValueError(f"num_preferences must be >= 1, got {num_preferences}")

  def loss_of_params(params, batch, alphas):
    return paretocl_loss(graphdef, optim.cast_floating(params, compute_dtype), batch, alphas)

  loss_of_params = optim.with_remat(loss_of_params, remat_policy)

  def step(state: optim.TrainState, batch: dict):
    rng, key = jax.random.split(state.rng)
    alphas = hypernet.sample_preferences(key, num_preferences, 2, concentration)  # [K, 2]
    (loss, aux), grads = jax.value_and_grad(loss_of_params, has_aux=True)(
        state.params, batch, alphas)
    state, info = optim.apply_gradients_or_skip(state.replace(rng=rng), grads, loss, optimizer)
    if state_sharding is not None:
      state = jax.lax.with_sharding_constraint(state, state_sharding)
    return state, {"loss": loss, **aux, **info}

  return jax.jit(step, donate_argnums=0)


def inference_preferences(num_preferences: int = 20, seed: int = 0) -> jax.Array:
  """The fixed, seeded set of K test-time preferences [K, 2] (Dirichlet(1, 1))."""
  return hypernet.sample_preferences(jax.random.key(seed), num_preferences)


def answer_entropy(logits: jax.Array, loss_mask: jax.Array, attention_mask: jax.Array,
                   mode: str) -> jax.Array:
  """Per-row entropy (nats) of the answer distribution; logits [..., B, S, V] -> [..., B].

  'first_token': the next-token distribution at the position before the first answer token
  (the last prompt token); 'teacher_forced': the mean over the positions predicting answer
  tokens. A row without answer tokens scores the last real token / 0.
  """
  ent = hypernet.softmax_entropy(logits[..., :-1, :])  # [..., B, S-1]: predicts token t+1
  target = loss_mask[:, 1:].astype(jnp.float32)  # [B, S-1]
  if mode == "teacher_forced":
    return (ent * target).sum(-1) / jnp.maximum(target.sum(-1), 1.0)
  if mode == "first_token":
    has_answer = target.sum(-1) > 0
    last_real = attention_mask.astype(jnp.int32).sum(-1) - 1
    first = jnp.where(has_answer, jnp.argmax(target, axis=-1), jnp.maximum(last_real, 0))
    first = jnp.minimum(first, ent.shape[-1] - 1)
    return jnp.take_along_axis(ent, jnp.broadcast_to(first, ent.shape[:-1])[..., None], -1)[..., 0]
  raise ValueError(f"entropy mode must be one of {ENTROPY_MODES}, got {mode!r}")


def make_predict_step(graphdef: nnx.GraphDef, *, num_preferences: int = 20, seed: int = 0,
                      entropy: str = "first_token", compute_dtype=None) -> Callable:
  """jit(predict)(params, batch) -> per-sample min-entropy choice among K fixed preferences.

  batch: an SFT device batch (sft.device_batch). Returns entropy [K, B], chosen [B] (index
  into `alphas`), alphas [K, 2], logits [B, S, V] under each row's chosen preference, and the
  teacher-forced scores of `sft.make_eval_step` (nll_sum, answer_tokens, correct_tokens,
  exact [B]) under that choice.
  """
  if entropy not in ENTROPY_MODES:
    raise ValueError(f"entropy mode must be one of {ENTROPY_MODES}, got {entropy!r}")
  alphas = inference_preferences(num_preferences, seed)

  def predict(params, batch):
    model = nnx.merge(graphdef, nnx.State(optim.cast_floating(params, compute_dtype)))
    hidden = model.hidden_states(batch["input_ids"], **_model_kwargs(batch))
    base_logits = model.base.logits(hidden)

    def entropy_of(alpha):
      logits = base_logits + model.adapter.delta(hidden, model.adapter.scales(alpha))
      return answer_entropy(logits, batch["loss_mask"], batch["attention_mask"], entropy)

    ent = jax.lax.map(entropy_of, alphas)  # [K, B]
    chosen = jnp.argmin(ent, axis=0)  # [B]
    logits = base_logits + model.adapter.delta(hidden, model.adapter.scales(alphas[chosen]))
    nll, hit = sft.token_nll(logits, batch["input_ids"])
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)
    n, correct = mask.sum(1), (hit * mask).sum(1)
    return {"entropy": ent, "chosen": chosen, "alphas": alphas, "logits": logits,
            "nll_sum": (nll * mask).sum(1), "answer_tokens": n, "correct_tokens": correct,
            "exact": ((correct == n) & (n > 0)).astype(jnp.float32)}

  return jax.jit(predict)


def make_prompt_select_step(graphdef: nnx.GraphDef, *, num_preferences: int = 20, seed: int = 0,
                            compute_dtype=None) -> Callable:
  """jit(select)(params, batch) -> {'chosen' [B], 'entropy' [K, B], 'alphas' [K, 2]} for a
  batch of prompts (input_ids / attention_mask, left- or right-padded, plus the model inputs
  of `sft.MODEL_KWARGS`): the entropy of the first answer token's distribution, i.e. the
  next-token logits after each row's last real prompt token (what decoding starts from)."""
  alphas = inference_preferences(num_preferences, seed)

  def select(params, batch):
    model = nnx.merge(graphdef, nnx.State(optim.cast_floating(params, compute_dtype)))
    hidden = model.hidden_states(batch["input_ids"], **_model_kwargs(batch))  # [B, S, D]
    real = batch["attention_mask"].astype(bool)
    last = real.shape[1] - 1 - jnp.argmax(real[:, ::-1], axis=1)  # [B]
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)  # [B, 1, D]
    base_logits = model.base.logits(hidden)
    ent = jax.lax.map(lambda a: hypernet.softmax_entropy(
        base_logits + model.adapter.delta(hidden, model.adapter.scales(a)))[:, 0], alphas)
    return {"chosen": jnp.argmin(ent, axis=0), "entropy": ent, "alphas": alphas}

  return jax.jit(select)


def folded_lm_head(model: ParetoVLM, alpha) -> jax.Array:
  """The LM-head kernel [D, V] of the ParetoVLM at one preference: head + A diag(s(alpha)) B."""
  base = model.base
  alpha = jnp.asarray(alpha, jnp.float32)
  if alpha.shape != (2,):
    raise ValueError(f"fold_preference takes one preference of shape (2,), got {alpha.shape}")
  kernel = (base.lm_head[...] if base.lm_head is not None
            else base.language_model.embed_tokens[...].T)  # [D, V]
  update = (model.adapter.down[...] * model.adapter.scales(alpha)) @ model.adapter.up[...]
  return (kernel + update).astype(kernel.dtype)


def fold_preference(model: ParetoVLM, alpha) -> models.Qwen2_5_VL:
  """A plain Qwen2.5-VL whose (untied) LM head is head + A diag(s(alpha)) B: the ParetoVLM at
  one fixed preference, for decoders (rl.sampler.Sampler) that take a Qwen2_5_VL. Shares the
  backbone arrays with `model`; a tied-embedding base gets its own lm_head. Another
  preference: `folded.lm_head.set_value(folded_lm_head(model, alpha))`."""
  base = model.base
  kernel = folded_lm_head(model, alpha)
  config = dataclasses.replace(base.config, tie_word_embeddings=False)
  folded = nnx.eval_shape(lambda: models.Qwen2_5_VL(
      config, dtype=base.language_model.dtype, param_dtype=kernel.dtype, rngs=nnx.Rngs(0)))
  nnx.update(folded, nnx.state(base))
  folded.lm_head.set_value(kernel)
  return folded


# ------------------------------------------------------------------ what the continual loop calls


def build(base: models.Qwen2_5_VL, config, *, seed: int = 0) -> ParetoVLM:
  """ParetoVLM around `base` from `config` (fields rank, hyper_hidden)."""
  return ParetoVLM(base, rank=config.rank, hyper_hidden=config.hyper_hidden,
                   rngs=nnx.Rngs(seed))


def train_task(model: ParetoVLM, new_batches, replay_batches, steps: int, config, *,
               seed: int = 0, on_step: Callable[[int, dict], None] | None = None) -> ParetoVLM:
  """Trains `model` in place on one task for `steps` steps and returns it (the step donates
  the model's arrays; the trained ones replace them at the end).

  new_batches / replay_batches: iterables of host SFT batches (current task; replay of earlier
  tasks); replay_batches=None (the first task) trains L_new alone, weighted by each sampled
  alpha_new. config: num_preferences, concentration, optim (optim.make_optimizer fields;
  freeze=('base',) trains the adapter only).
  """
  graphdef, params = nnx.split(model)
  params = nnx.to_pure_dict(params)
  optimizer = optim.make_optimizer(config.optim, params, steps)
  state = optim.create_train_state(params, optimizer, jax.random.PRNGKey(seed))
  step_fn = make_train_step(graphdef, optimizer, num_preferences=config.num_preferences,
                            concentration=config.concentration)
  new_it = iter(new_batches)
  replay_it = iter(replay_batches) if replay_batches is not None else None
  for i in range(steps):
    new = next(new_it)
    if replay_it is not None:
      batch = concat_batches(model.config, new, next(replay_it))
    else:
      batch = {**new, "is_new": np.ones(len(new["input_ids"]), np.int32)}
    state, metrics = step_fn(state, device_batch(batch))
    if on_step is not None:
      on_step(i, jax.device_get(metrics))
  trained = nnx.state(model)
  nnx.replace_by_pure_dict(trained, state.params)
  nnx.update(model, trained)
  return model
