"""Supervised fine-tuning: cross-entropy on answer tokens only, one jitted step.

The batch follows the SFT contract (cpt_jax.data): input_ids / attention_mask /
loss_mask [B, S] (loss_mask[t] = 1 where token t is an answer token predicted from
t - 1), plus what the model needs (position_ids [3, B, S], pixel_values, vision_inputs).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax.train import optim
from cpt_jax.train.token_logprobs import token_logprobs

PyTree = Any

# Batch entries a train or eval step reads; the rest (task names, image_grid_thw
# metadata already folded into vision_inputs) stays on the host.
MODEL_KWARGS = ("attention_mask", "position_ids", "pixel_values", "vision_inputs")
DEVICE_KEYS = ("input_ids", "loss_mask") + MODEL_KWARGS


def device_batch(batch: dict) -> dict:
  """The part of a host batch that goes to the devices (no strings; no image inputs for a
  batch without images)."""
  missing = [k for k in ("input_ids", "attention_mask", "loss_mask") if k not in batch]
  if missing:
    raise ValueError(f"SFT batch lacks {missing}; it has {sorted(batch)}")
  out = {k: batch[k] for k in DEVICE_KEYS if k in batch and batch[k] is not None}
  if "pixel_values" in out and len(out["pixel_values"]) == 0:
    out.pop("pixel_values")
    out.pop("vision_inputs", None)
  return out


def token_nll_and_hit(graphdef: nnx.GraphDef, params: PyTree, batch: dict, *,
                      loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Next-token NLL and argmax hit at each position t >= 1 ([B, S-1] each) of the model
  `graphdef` with weights `params` on `batch`, through `token_logprobs` (the LM head and the
  loss in one step, `loss_chunk` tokens at a time; 0: all at once)."""
  model = nnx.merge(graphdef, nnx.State(params))
  kwargs = {k: batch[k] for k in MODEL_KWARGS if k in batch}
  hidden = model.hidden_states(batch["input_ids"], **kwargs)       # [B, S, D]
  # Position t predicts token t + 1; the last position wraps around and is dropped.
  targets = jnp.roll(batch["input_ids"], -1, axis=1)
  logprob, hit = token_logprobs(hidden, model.head_kernel(), targets, chunk=loss_chunk)
  return -logprob[:, :-1], hit[:, :-1]


def target_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log_softmax(logits)[..., target] in float32, written as picked logit - logsumexp with a
  one-hot pick: its gradient (softmax - one_hot) fuses into one elementwise pass, where a
  gather's gradient is a scatter into a zero [.., V] array."""
  logits = logits.astype(jnp.float32)
  one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32)
  return jnp.sum(logits * one_hot, axis=-1) - jax.nn.logsumexp(logits, axis=-1)


def token_nll(logits: jax.Array, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`token_nll_and_hit` from given logits [B, S, V] (e.g. of a head other than the model's).

  Computed at all S positions (position t predicts token t + 1; the last wraps around and is
  dropped) so that the [B, S, V] logits are never sliced: a slice's gradient pads them.
  """
  targets = jnp.roll(input_ids, -1, axis=1)               # [B, S]
  logprob = target_logprobs(logits, targets)
  # The target's logit is the largest (argmax's own reduction is slow on XLA:CPU).
  hit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] >= logits.max(axis=-1)
  return -logprob[:, :-1], hit[:, :-1]


def answer_loss(nll: jax.Array, hit: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict]:
  """Token-mean of `nll` [B, S-1] over the batch's answer tokens (loss_mask [B, S]).

  Returns (loss, aux) with aux = answer-token count and next-token accuracy.
  A batch without answer tokens has loss 0 (and no gradient).
  """
  mask = loss_mask[:, 1:].astype(jnp.float32)             # [B, S-1]
  n = mask.sum()
  denom = jnp.maximum(n, 1.0)
  loss = (nll * mask).sum() / denom
  accuracy = (hit * mask).sum() / denom
  return loss, {"answer_tokens": n, "accuracy": accuracy}


def loss_fn(logits: jax.Array, input_ids: jax.Array,
            loss_mask: jax.Array) -> tuple[jax.Array, dict]:
  """`answer_loss` of given logits [B, S, V]."""
  return answer_loss(*token_nll(logits, input_ids), loss_mask)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optim.Optimizer, *,
                    compute_dtype=None, remat_policy: str | None = None,
                    state_sharding: PyTree | None = None, loss_chunk: int = 0,
                    steps_per_call: int = 1) -> Callable:
  """jit(step)(state, batch) -> (state, metrics); `state` is donated.

  compute_dtype: dtype of the weights in the forward (e.g. jnp.bfloat16); the
    float32 master weights and optimizer state are untouched by it.
  remat_policy: a `jax.checkpoint_policies` name applied to the whole forward
    (e.g. 'dots_with_no_batch_dims_saveable'); per-layer remat is the model's.
  state_sharding: the TrainState's shardings, kept for the output state.
  loss_chunk: tokens per LM-head + loss chunk (`token_logprobs`); 0: all at once.
  steps_per_call: > 1 makes one program of that many steps (a `lax.scan`): every batch leaf
    then has a leading axis of steps_per_call (one batch per step), and so has every metric.
    On CPU this saves the per-call allocation of the step's temporary buffers.
  """
  if steps_per_call < 1:
    raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}")

  def loss_of_params(params, batch):
    nll, hit = token_nll_and_hit(graphdef, optim.cast_floating(params, compute_dtype), batch,
                                 loss_chunk=loss_chunk)
    return answer_loss(nll, hit, batch["loss_mask"])

  loss_of_params = optim.with_remat(loss_of_params, remat_policy)

  def step(state: optim.TrainState, batch: dict):
    (loss, aux), grads = jax.value_and_grad(loss_of_params, has_aux=True)(state.params, batch)
    state, info = optim.apply_gradients_or_skip(state, grads, loss, optimizer)
    if state_sharding is not None:
      state = jax.lax.with_sharding_constraint(state, state_sharding)
    tokens = batch["attention_mask"].sum()
    return state, {"loss": loss, "tokens": tokens, **aux, **info}

  if steps_per_call == 1:
    return jax.jit(step, donate_argnums=0)

  def steps(state: optim.TrainState, batches: dict):
    return jax.lax.scan(step, state, batches, length=steps_per_call)

  return jax.jit(steps, donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, *, compute_dtype=None, loss_chunk: int = 0) -> Callable:
  """jit(eval)(params, batch) -> per-example teacher-forced answer scores.

  Returns nll_sum, answer_tokens, correct_tokens and exact [B] (1 when the
  greedy next-token prediction is right at every answer token). This is a cheap
  proxy: the papers' accuracy decodes a full response and extracts the answer.
  """
  def evaluate(params, batch):
    nll, hit = token_nll_and_hit(graphdef, optim.cast_floating(params, compute_dtype), batch,
                                 loss_chunk=loss_chunk)
    mask = batch["loss_mask"][:, 1:].astype(jnp.float32)   # [B, S-1]
    n = mask.sum(axis=1)
    correct = (hit * mask).sum(axis=1)
    return {"nll_sum": (nll * mask).sum(axis=1), "answer_tokens": n,
            "correct_tokens": correct, "exact": ((correct == n) & (n > 0)).astype(jnp.float32)}

  return jax.jit(evaluate)


def summarize_eval(per_example: list[dict], tasks: list[np.ndarray]) -> dict[str, float]:
  """Aggregates `make_eval_step` outputs (host numpy) per task and overall."""
  cat = {k: np.concatenate([np.asarray(d[k]) for d in per_example]) for k in per_example[0]}
  task = np.concatenate([np.asarray(t) for t in tasks]).astype(str)
  keep = cat["answer_tokens"] > 0            # padding rows of a last partial batch have none
  out = {}
  for name in sorted(set(task[keep])) + ["all"]:
    sel = keep & ((task == name) if name != "all" else True)
    tokens = cat["answer_tokens"][sel].sum()
    out[f"{name}/exact_match"] = float(cat["exact"][sel].mean())
    out[f"{name}/token_accuracy"] = float(cat["correct_tokens"][sel].sum() / tokens)
    out[f"{name}/nll"] = float(cat["nll_sum"][sel].sum() / tokens)
  return out
