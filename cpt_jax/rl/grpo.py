"""GRPO math, model-free and pure `jnp`: config, advantages, KL estimators, clipped loss.

Notation (papers.md, "GRPO as the authors ran it"): a prompt x gets a group of G responses
o_1..o_G with rewards r_i; the advantage A_i is shared by every token of o_i; per token t,
rho_t = pi_theta(o_t | .) / pi_old(o_t | .) and the policy loss is the dual-clipped PPO loss

  l_t = -A * clip(rho_t, 1 - eps_low, 1 + eps_high)   (the pessimistic max of clipped/unclipped)
  l_t = min(l_t, -c * A)   for A < 0                   (dual clip, c = `dual_clip`)

aggregated over tokens (`loss_agg`), plus beta * KL(pi_theta || pi_ref) with a sampled per-token
estimator (`kl_estimator`, beta = `kl_coef`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from cpt_jax.rl import rewards

# exp() of a log-ratio beyond this overflows float32 or gives useless ratios; verl clamps the same.
_LOG_RATIO_CLAMP = 20.0
# verl clamps the k3 value itself to [-10, 10] for stability; beyond it the KL term has no gradient.
_K3_VALUE_CLAMP = 10.0

AdvantageFn = Callable[[jax.Array, "jax.Array | None", float], jax.Array]
KLFn = Callable[[jax.Array, jax.Array], jax.Array]

_ADVANTAGES: dict[str, AdvantageFn] = {}
_KL_ESTIMATORS: dict[str, KLFn] = {}
LOSS_AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum",
                     "seq_mean_token_sum_norm")


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
  """Registers `fn(rewards [P, G], baseline [P] | None, eps) -> advantages [P, G]`."""
  def decorate(fn: AdvantageFn) -> AdvantageFn:
    if name in _ADVANTAGES:
      raise ValueError(f"advantage estimator {name!r} is already registered")
    _ADVANTAGES[name] = fn
    return fn
  return decorate


def register_kl_estimator(name: str) -> Callable[[KLFn], KLFn]:
  """Registers `fn(logp [B, T], ref_logp [B, T]) -> per-token KL estimate [B, T]`."""
  def decorate(fn: KLFn) -> KLFn:
    if name in _KL_ESTIMATORS:
      raise ValueError(f"KL estimator {name!r} is already registered")
    _KL_ESTIMATORS[name] = fn
    return fn
  return decorate


def get_advantage(name: str) -> AdvantageFn:
  if name not in _ADVANTAGES:
    raise ValueError(f"unknown advantage estimator {name!r}; registered: {sorted(_ADVANTAGES)}")
  return _ADVANTAGES[name]


def get_kl_estimator(name: str) -> KLFn:
  if name not in _KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {name!r}; registered: {sorted(_KL_ESTIMATORS)}")
  return _KL_ESTIMATORS[name]


# Estimators that need a group of at least two responses.
_GROUP_ESTIMATORS = ("grpo", "rloo", "drgrpo")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO hyper-parameters; defaults reproduce the paper's runs.

  Sampling: G = `n` responses per prompt at `temperature`, nucleus `top_p`; evaluation samples at
  `eval_temperature`. Loss: PPO ratio clipped to [1 - eps_low, 1 + eps_high] (`eps_low`,
  `eps_high`), dual clip c = `dual_clip` for A < 0 (None: off), KL to the frozen reference with
  beta = `kl_coef` and estimator `kl_estimator` (off when `use_kl` is False or beta = 0), token
  aggregation `loss_agg`. Advantages: `advantage` (grpo, rloo, remax, drgrpo) with
  A_i = (r_i - mean(r)) / (std(r) + `adv_eps`) for grpo. Schedule: `rollout_batch_size` prompts
  per rollout, `update_batch_size` prompts per optimiser step, `ppo_epochs` passes. Optimiser:
  AdamW `lr`, `weight_decay`, `warmup_steps`, global-norm clip `grad_clip`. Dr.GRPO is
  `advantage="drgrpo", loss_agg="seq_mean_token_sum_norm"` (normalised by `max_response_length`).
  """
  n: int = 8
  temperature: float = 1.0
  top_p: float = 0.99
  eval_temperature: float = 0.5
  max_prompt_length: int = 4096
  max_response_length: int = 1024
  reward: str = "cot_boxed"
  advantage: str = "grpo"
  adv_eps: float = 1e-6
  eps_low: float = 0.2
  eps_high: float = 0.3
  dual_clip: float | None = 3.0
  use_kl: bool = True
  kl_coef: float = 0.01
  kl_estimator: str = "low_var_kl"
  loss_agg: str = "token_mean"
  ppo_epochs: int = 1
  rollout_batch_size: int = 512
  update_batch_size: int = 128
  lr: float = 1e-6
  weight_decay: float = 0.01
  warmup_steps: int = 0
  grad_clip: float = 1.0

  def __post_init__(self):
    errors = []
    if self.n < 1:
      errors.append(f"n (responses per prompt) must be >= 1, got {self.n}")
    elif self.n < 2 and self.advantage in _GROUP_ESTIMATORS:
      errors.append(f"advantage {self.advantage!r} compares responses within a group: n must be"
                    f" >= 2, got {self.n}")
    for name in ("temperature", "lr", "adv_eps"):
      if not getattr(self, name) > 0:
        errors.append(f"{name} must be > 0, got {getattr(self, name)}")
    if not 0 < self.top_p <= 1:
      errors.append(f"top_p must be in (0, 1], got {self.top_p}")
    if not self.eval_temperature >= 0:
      errors.append(f"eval_temperature must be >= 0 (0 = greedy), got {self.eval_temperature}")
    if not 0 <= self.eps_low < 1:
      errors.append(f"eps_low must be in [0, 1), got {self.eps_low}")
    if not self.eps_high >= 0:
      errors.append(f"eps_high must be >= 0, got {self.eps_high}")
    if self.dual_clip is not None and not self.dual_clip > 1:
      errors.append(f"dual_clip must be > 1 (or None to disable), got {self.dual_clip}")
    for name in ("kl_coef", "weight_decay", "warmup_steps", "grad_clip"):
      if not getattr(self, name) >= 0:
        errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
    for name in ("max_prompt_length", "max_response_length", "ppo_epochs", "rollout_batch_size",
                 "update_batch_size"):
      if getattr(self, name) < 1:
        errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
    if self.update_batch_size >= 1 and self.rollout_batch_size % self.update_batch_size:
      errors.append(f"rollout_batch_size {self.rollout_batch_size} is not a multiple of "
                    f"update_batch_size {self.update_batch_size}")
    if self.advantage not in _ADVANTAGES:
      errors.append(f"unknown advantage {self.advantage!r}; registered: {sorted(_ADVANTAGES)}")
    if self.kl_estimator not in _KL_ESTIMATORS:
      errors.append(f"unknown kl_estimator {self.kl_estimator!r}; registered: "
                    f"{sorted(_KL_ESTIMATORS)}")
    if self.loss_agg not in LOSS_AGGREGATIONS:
      errors.append(f"unknown loss_agg {self.loss_agg!r}; choose from {LOSS_AGGREGATIONS}")
    if self.reward not in rewards.reward_names():
      errors.append(f"unknown reward {self.reward!r}; registered: {rewards.reward_names()}")
    if errors:
      raise ValueError("invalid GRPOConfig: " + "; ".join(errors))

  @property
  def kl_enabled(self) -> bool:
    return self.use_kl and self.kl_coef > 0


# ----------------------------------------------------------------------------- advantages

@register_advantage("grpo")
def _grpo_advantage(rewards: jax.Array, baseline: jax.Array | None, eps: float) -> jax.Array:
  # Sample std (ddof=1), as torch.std in verl / EasyR1, which the authors trained with.
  del baseline
  mean = rewards.mean(axis=1, keepdims=True)
  std = rewards.std(axis=1, ddof=1, keepdims=True)
  return (rewards - mean) / (std + eps)


@register_advantage("drgrpo")
def _drgrpo_advantage(rewards: jax.Array, baseline: jax.Array | None, eps: float) -> jax.Array:
  # Dr.GRPO: no division by the group std (it up-weights near-unanimous groups).
  del baseline, eps
  return rewards - rewards.mean(axis=1, keepdims=True)


@register_advantage("rloo")
def _rloo_advantage(rewards: jax.Array, baseline: jax.Array | None, eps: float) -> jax.Array:
  # r_i - mean_{j != i} r_j  ==  G / (G - 1) * (r_i - mean_j r_j).
  del baseline, eps
  group = rewards.shape[1]
  return (rewards - rewards.mean(axis=1, keepdims=True)) * (group / (group - 1))


@register_advantage("remax")
def _remax_advantage(rewards: jax.Array, baseline: jax.Array | None, eps: float) -> jax.Array:
  # ReMax: the baseline is the reward of the prompt's greedy response.
  del eps
  if baseline is None:
    raise ValueError("advantage 'remax' needs `baseline`: the greedy response's reward per prompt")
  return rewards - baseline[:, None]


def compute_advantages(rewards: jax.Array, cfg: GRPOConfig,
                       baseline: jax.Array | None = None) -> jax.Array:
  """Per-response advantages.

  rewards: [P * G] group-major (the G responses of a prompt are consecutive) or [P, G];
  baseline: [P], only for 'remax'. Returns float32 advantages with the shape of `rewards`.
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  group = cfg.n
  if rewards.ndim == 1:
    if rewards.shape[0] % group:
      raise ValueError(f"rewards has {rewards.shape[0]} entries, not a multiple of the group "
                       f"size n={group}")
    grouped = rewards.reshape(-1, group)  # [P, G]
  elif rewards.ndim == 2 and rewards.shape[1] == group:
    grouped = rewards
  else:
    raise ValueError(f"rewards must be [P * {group}] or [P, {group}], got shape {rewards.shape}")
  if baseline is not None:
    baseline = jnp.asarray(baseline, jnp.float32)
    if baseline.shape != (grouped.shape[0],):
      raise ValueError(f"baseline must be [P]=[{grouped.shape[0]}], got {baseline.shape}")
  advantages = get_advantage(cfg.advantage)(grouped, baseline, cfg.adv_eps)
  return advantages.reshape(rewards.shape)


# ----------------------------------------------------------------------------- KL estimators

@register_kl_estimator("kl")
def _k1(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k1 = log pi - log pi_ref: unbiased, high variance, can be negative."""
  return logp - ref_logp


@register_kl_estimator("mse")
def _k2(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k2 = (log pi - log pi_ref)^2 / 2: biased, low variance, >= 0."""
  return 0.5 * jnp.square(logp - ref_logp)


@register_kl_estimator("low_var_kl")
def _k3(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
  """k3 = exp(d) - d - 1 with d = log pi_ref - log pi: unbiased for KL(pi || pi_ref), >= 0.

  Clamped as verl does for stability: d to [-20, 20] before exp, the value to [-10, 10]
  (so a token with k3 > 10 contributes a constant, gradient-free 10).
  """
  d = jnp.clip(ref_logp - logp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  return jnp.clip(jnp.exp(d) - d - 1.0, -_K3_VALUE_CLAMP, _K3_VALUE_CLAMP)


# ----------------------------------------------------------------------------- loss

def aggregate(values: jax.Array, mask: jax.Array, mode: str, max_response_length: int
              ) -> jax.Array:
  """Reduces per-token values [B, T] under mask [B, T] to a scalar.

  token_mean: sum over all valid tokens / their count (long responses weigh more; with
    gradient accumulation, scale each micro-batch's value by its share of the tokens).
  seq_mean_token_mean: mean over responses of each response's token mean.
  seq_mean_token_sum: mean over responses of each response's token sum.
  seq_mean_token_sum_norm: Dr.GRPO: mean over responses of token sum / max_response_length.
  Responses with no valid token are left out of the means over responses.
  """
  mask = mask.astype(values.dtype)
  token_sums = (values * mask).sum(axis=1)  # [B]
  token_counts = mask.sum(axis=1)  # [B]
  if mode == "token_mean":
    return token_sums.sum() / jnp.maximum(token_counts.sum(), 1.0)
  has_tokens = (token_counts > 0).astype(values.dtype)  # [B]
  num_responses = jnp.maximum(has_tokens.sum(), 1.0)
  if mode == "seq_mean_token_mean":
    per_response = token_sums / jnp.maximum(token_counts, 1.0)
  elif mode == "seq_mean_token_sum":
    per_response = token_sums
  elif mode == "seq_mean_token_sum_norm":
    per_response = token_sums / max_response_length
  else:
    raise ValueError(f"unknown loss aggregation {mode!r}; choose from {LOSS_AGGREGATIONS}")
  return (per_response * has_tokens).sum() / num_responses


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(jnp.float32)
  return (values.astype(jnp.float32) * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def policy_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
                advantages: jax.Array, mask: jax.Array, cfg: GRPOConfig
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Dual-clipped PPO loss with an optional KL penalty; differentiable w.r.t. `logp`.

  logp, old_logp, ref_logp: [B, T] log-probabilities of the sampled response tokens under the
  policy being trained, the policy that sampled them, and the frozen reference (None when the
  KL term is off). advantages: [B]. mask: [B, T], 1 on response tokens.
  Returns (loss, metrics): pg_loss, kl (the aggregated estimate; logged even when the KL term is
  off if ref_logp is given), clip_frac (tokens where the eps clip is active), dual_clip_frac
  (tokens capped by the dual clip), ratio_mean and ppo_kl (token-mean log(pi_old / pi)).
  """
  if logp.ndim != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
    raise ValueError(f"logp {logp.shape}, old_logp {old_logp.shape} and mask {mask.shape} must "
                     "all be [B, T]")
  if ref_logp is not None and ref_logp.shape != logp.shape:
    raise ValueError(f"ref_logp {ref_logp.shape} must match logp {logp.shape}")
  if advantages.shape != logp.shape[:1]:
    raise ValueError(f"advantages {advantages.shape} must be [B]=[{logp.shape[0]}]")
  if cfg.kl_enabled and ref_logp is None:
    raise ValueError("the KL term is on (use_kl and kl_coef > 0) but ref_logp is None")
  if cfg.loss_agg == "seq_mean_token_sum_norm" and logp.shape[1] > cfg.max_response_length:
    raise ValueError(f"responses have {logp.shape[1]} tokens > max_response_length "
                     f"{cfg.max_response_length}, the Dr.GRPO normaliser")

  adv = advantages.astype(logp.dtype)[:, None]  # [B, 1]
  log_ratio = jnp.clip(logp - old_logp, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)  # [B, T]
  ratio = jnp.exp(log_ratio)
  loss_unclipped = -adv * ratio
  loss_clipped = -adv * jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
  per_token = jnp.maximum(loss_unclipped, loss_clipped)  # [B, T]
  clipped = loss_clipped > loss_unclipped
  if cfg.dual_clip is not None:
    # For A < 0 the clipped loss grows without bound in rho; cap it at -c * A.
    cap = -adv * cfg.dual_clip
    dual_clipped = (adv < 0) & (per_token > cap)
    per_token = jnp.where(adv < 0, jnp.minimum(per_token, cap), per_token)
  else:
    dual_clipped = jnp.zeros_like(clipped)

  agg = lambda values: aggregate(values, mask, cfg.loss_agg, cfg.max_response_length)
  pg_loss = agg(per_token)
  loss = pg_loss
  if ref_logp is not None:
    kl_per_token = get_kl_estimator(cfg.kl_estimator)(logp, ref_logp)
    if cfg.kl_enabled:
      kl = agg(kl_per_token)
      loss = pg_loss + cfg.kl_coef * kl
    else:
      kl = jax.lax.stop_gradient(agg(kl_per_token))
  else:
    kl = jnp.zeros((), logp.dtype)
  metrics = {
      "pg_loss": pg_loss,
      "kl": kl,
      "clip_frac": _masked_mean(clipped, mask),
      "dual_clip_frac": _masked_mean(dual_clipped, mask),
      "ratio_mean": _masked_mean(jax.lax.stop_gradient(ratio), mask),
      "ppo_kl": _masked_mean(jax.lax.stop_gradient(-log_ratio), mask),
  }
  return loss, metrics


# ----------------------------------------------------------------------------- group metrics

def group_metrics(rewards: jax.Array, n: int) -> dict[str, jax.Array]:
  """Reward statistics of rollout groups: rewards [P * n] (group-major) or [P, n].

  reward_mean; reward_var_within: mean over prompts of the population variance Var_a[r(x, a)],
  the factor that scales the RFT update in the paper's theory; zero_var_frac: fraction of groups
  whose rewards are all equal (zero GRPO gradient).
  """
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim == 1 and rewards.shape[0] % n == 0:
    rewards = rewards.reshape(-1, n)
  if rewards.ndim != 2 or rewards.shape[1] != n:
    raise ValueError(f"rewards must be [P * {n}] or [P, {n}], got shape {rewards.shape}")
  spread = rewards.max(axis=1) - rewards.min(axis=1)  # [P]
  return {
      "reward_mean": rewards.mean(),
      "reward_var_within": rewards.var(axis=1).mean(),
      "zero_var_frac": (spread <= 1e-6).astype(jnp.float32).mean(),
  }
