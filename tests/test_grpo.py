"""GRPO losses, gradients, advantages and KL estimators against hand-computed numbers."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.rl import grpo
from cpt_jax.rl.grpo import GRPOConfig

# ----------------------------------------------------------------------------- hand case
# Two groups of two responses (B = 4), three tokens each; eps_low 0.2, eps_high 0.3, c = 3.
# Row 2's last token is padding. Ratios rho = pi / pi_old and advantages are chosen so that every
# branch of the loss is hit. Per token, loss = max(-A rho, -A clip(rho, 0.8, 1.3)), capped at
# -3A when A < 0; its gradient w.r.t. log pi is -A rho where the unclipped branch is active, else 0.
#   row 0, A =  1   : rho 1.1 -> -1.1 (grad -1.1); 1.5 -> -1.3 (clipped, 0); 0.5 -> -0.5 (-0.5)
#   row 1, A = -1   : rho 0.7 ->  0.8 (clipped, 0); 1.2 -> 1.2 (1.2); 4.0 -> 4 capped at 3 (dual, 0)
#   row 2, A =  2   : rho 1.0 -> -2 (-2); 1.25 -> -2.5 (-2.5); 2.0 -> padding
#   row 3, A = -0.5 : rho 0.9 -> 0.45 (0.45); 1.4 -> 0.7 (0.7); 10 -> 5 capped at 1.5 (dual, 0)
# 11 valid tokens; sum of losses = -2.9 + 5.0 - 4.5 + 2.65 = 0.25; token mean = 0.25 / 11.
RATIOS = np.array([[1.1, 1.5, 0.5], [0.7, 1.2, 4.0], [1.0, 1.25, 2.0], [0.9, 1.4, 10.0]])
ADVANTAGES = np.array([1.0, -1.0, 2.0, -0.5])
MASK = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
TOKEN_LOSS = np.array([[-1.1, -1.3, -0.5], [0.8, 1.2, 3.0], [-2.0, -2.5, 0.0], [0.45, 0.7, 1.5]])
TOKEN_GRAD = np.array([[-1.1, 0, -0.5], [0, 1.2, 0], [-2.0, -2.5, 0], [0.45, 0.7, 0]])
OLD_LOGP = np.log(np.array([[0.5, 0.2, 0.4], [0.3, 0.6, 0.1], [0.9, 0.4, 0.2], [0.5, 0.5, 0.05]]))
LOGP = OLD_LOGP + np.log(RATIOS)
NO_KL = GRPOConfig(n=2, use_kl=False)


# One compile per config gives loss, metrics and gradient w.r.t. logp.
_value_and_grad = jax.jit(
    jax.value_and_grad(lambda *args, cfg: grpo.policy_loss(*args, cfg), has_aux=True),
    static_argnames="cfg")


def _loss(cfg, ref_logp=None):
  """(loss, metrics, d loss / d logp) at LOGP."""
  args = (jnp.asarray(LOGP, jnp.float32), jnp.asarray(OLD_LOGP, jnp.float32),
          None if ref_logp is None else jnp.asarray(ref_logp, jnp.float32),
          jnp.asarray(ADVANTAGES, jnp.float32), jnp.asarray(MASK))
  (loss, metrics), grad = _value_and_grad(*args, cfg=cfg)
  return loss, metrics, np.asarray(grad)


def test_token_mean_loss_metrics_and_gradient_by_hand():
  loss, metrics, grad = _loss(NO_KL)
  np.testing.assert_allclose(loss, 0.25 / 11, rtol=1e-5)
  np.testing.assert_allclose(metrics["pg_loss"], 0.25 / 11, rtol=1e-5)
  np.testing.assert_allclose(metrics["clip_frac"], 2 / 11, rtol=1e-6)  # rows 0 and 1, token 1/0
  np.testing.assert_allclose(metrics["dual_clip_frac"], 2 / 11, rtol=1e-6)
  np.testing.assert_allclose(metrics["ratio_mean"], 23.55 / 11, rtol=1e-5)
  np.testing.assert_allclose(metrics["ppo_kl"], -np.log(RATIOS)[MASK == 1].mean(), rtol=1e-5)
  assert float(metrics["kl"]) == 0.0
  np.testing.assert_allclose(grad, TOKEN_GRAD / 11, atol=1e-6)


def test_without_dual_clip_negative_advantages_are_unbounded():
  cfg = dataclasses.replace(NO_KL, dual_clip=None)
  loss, metrics, grad = _loss(cfg)
  # Tokens (1, 2) and (3, 2) now keep -A rho: 4.0 and 5.0 instead of 3.0 and 1.5.
  np.testing.assert_allclose(loss, (0.25 + 1.0 + 3.5) / 11, rtol=1e-5)
  assert float(metrics["dual_clip_frac"]) == 0.0
  expected = TOKEN_GRAD.copy()
  expected[1, 2], expected[3, 2] = 4.0, 5.0
  np.testing.assert_allclose(grad, expected / 11, atol=1e-5)


@pytest.mark.parametrize("mode,expected", [
    ("seq_mean_token_mean", np.mean([-2.9 / 3, 5.0 / 3, -4.5 / 2, 2.65 / 3])),
    ("seq_mean_token_sum", np.mean([-2.9, 5.0, -4.5, 2.65])),
    ("seq_mean_token_sum_norm", np.mean([-2.9, 5.0, -4.5, 2.65]) / 4),  # / max_response_length
])
def test_sequence_aggregations_by_hand(mode, expected):
  cfg = dataclasses.replace(NO_KL, loss_agg=mode, max_response_length=4)
  np.testing.assert_allclose(_loss(cfg)[0], expected, rtol=1e-5)


def test_rows_without_tokens_do_not_count():
  values = jnp.array([[1.0, 3.0], [5.0, 7.0]])
  mask = jnp.array([[1, 1], [0, 0]])
  for mode, expected in [("token_mean", 2.0), ("seq_mean_token_mean", 2.0),
                         ("seq_mean_token_sum", 4.0), ("seq_mean_token_sum_norm", 1.0)]:
    np.testing.assert_allclose(grpo.aggregate(values, mask, mode, 4), expected)
  assert float(grpo.aggregate(values, jnp.zeros((2, 2)), "token_mean", 4)) == 0.0


def test_kl_term_adds_beta_times_k3_and_its_gradient():
  cfg = GRPOConfig(n=2)  # paper defaults: low_var_kl, beta = 0.01
  d = np.array([[0.1, -0.3, 0.5], [1.0, -1.0, 0.0], [0.2, 0.4, 3.0], [-0.5, 0.05, 2.0]])
  ref_logp = LOGP + d  # d = log pi_ref - log pi
  k3 = np.exp(d) - d - 1
  kl = k3[MASK == 1].mean()
  loss, metrics, grad = _loss(cfg, ref_logp=ref_logp)
  np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-5)
  np.testing.assert_allclose(loss, 0.25 / 11 + 0.01 * kl, rtol=1e-5)
  # d k3 / d log pi = 1 - exp(d).
  np.testing.assert_allclose(grad, (TOKEN_GRAD + 0.01 * (1 - np.exp(d)) * MASK) / 11, atol=1e-6)
  # KL off (ablation): the same KL is logged but adds no loss and no gradient.
  for off in (NO_KL, dataclasses.replace(cfg, kl_coef=0.0)):
    off_loss, off_metrics, off_grad = _loss(off, ref_logp=ref_logp)
    np.testing.assert_allclose(off_loss, 0.25 / 11, rtol=1e-5)
    np.testing.assert_allclose(off_metrics["kl"], kl, rtol=1e-5)
    np.testing.assert_allclose(off_grad, TOKEN_GRAD / 11, atol=1e-6)


def test_on_policy_step_from_rewards_end_to_end():
  # Group rewards [1, 0] and [0.1, 1.0]: sample std of a pair [x, y] is |x - y| / sqrt(2), so
  # A = +-(|x - y| / 2) / (|x - y| / sqrt(2) + 1e-6) ~ +-1/sqrt(2). On the first PPO epoch
  # rho = 1, so the token-mean loss is -sum_b A_b * len_b / num_tokens.
  rewards = jnp.array([1.0, 0.0, 0.1, 1.0])
  adv = jax.jit(grpo.compute_advantages, static_argnames="cfg")(rewards, cfg=GRPOConfig(n=2))
  np.testing.assert_allclose(adv, np.array([1, -1, -1, 1]) / np.sqrt(2), rtol=1e-5)
  logp = jnp.asarray(OLD_LOGP, jnp.float32)
  loss, metrics = jax.jit(grpo.policy_loss, static_argnames="cfg")(
      logp, logp, None, adv, jnp.asarray(MASK), cfg=NO_KL)
  lengths = MASK.sum(axis=1)
  np.testing.assert_allclose(loss, -(np.asarray(adv) * lengths).sum() / 11, rtol=1e-5, atol=1e-7)
  assert float(metrics["clip_frac"]) == 0.0 and float(metrics["ratio_mean"]) == 1.0


def test_policy_loss_shape_errors():
  logp = jnp.zeros((4, 3))
  with pytest.raises(ValueError, match="advantages"):
    grpo.policy_loss(logp, logp, None, jnp.zeros(3), jnp.ones((4, 3)), NO_KL)
  with pytest.raises(ValueError, match="must all be"):
    grpo.policy_loss(logp, jnp.zeros((4, 2)), None, jnp.zeros(4), jnp.ones((4, 3)), NO_KL)
  with pytest.raises(ValueError, match="ref_logp is None"):
    grpo.policy_loss(logp, logp, None, jnp.zeros(4), jnp.ones((4, 3)), GRPOConfig(n=2))
  dr = GRPOConfig(n=2, use_kl=False, loss_agg="seq_mean_token_sum_norm", max_response_length=2)
  with pytest.raises(ValueError, match="max_response_length"):
    grpo.policy_loss(logp, logp, None, jnp.zeros(4), jnp.ones((4, 3)), dr)


# ----------------------------------------------------------------------------- advantages
# Group 1: rewards [1, 0, 1, 1], mean 0.75, deviations [.25, -.75, .25, .25], sample variance
# 0.75 / 3 = 0.25, std 0.5. Group 2: all 0.1 (zero variance).
REWARDS = np.array([[1.0, 0.0, 1.0, 1.0], [0.1, 0.1, 0.1, 0.1]])
ADVANTAGE_CASES = {
    "grpo": np.array([[0.25, -0.75, 0.25, 0.25], [0, 0, 0, 0]]) / (0.5 + 1e-6),
    "drgrpo": np.array([[0.25, -0.75, 0.25, 0.25], [0, 0, 0, 0]]),
    # r_i - mean of the other three: 1 - 2/3, 0 - 1, ...
    "rloo": np.array([[1 / 3, -1.0, 1 / 3, 1 / 3], [0, 0, 0, 0]]),
    # minus the greedy response's reward, [1.0, 0.0] per prompt
    "remax": np.array([[0.0, -1.0, 0.0, 0.0], [0.1, 0.1, 0.1, 0.1]]),
}


@pytest.mark.parametrize("name", sorted(ADVANTAGE_CASES))
def test_advantages_by_hand(name):
  cfg = GRPOConfig(n=4, advantage=name)
  baseline = jnp.array([1.0, 0.0]) if name == "remax" else None
  grouped = grpo.compute_advantages(jnp.asarray(REWARDS), cfg, baseline)
  np.testing.assert_allclose(grouped, ADVANTAGE_CASES[name], rtol=1e-5, atol=1e-6)
  flat = grpo.compute_advantages(jnp.asarray(REWARDS.reshape(-1)), cfg, baseline)
  np.testing.assert_allclose(flat, ADVANTAGE_CASES[name].reshape(-1), rtol=1e-5, atol=1e-6)


def test_advantage_errors():
  with pytest.raises(ValueError, match="baseline"):
    grpo.compute_advantages(jnp.zeros(8), GRPOConfig(n=4, advantage="remax"))
  with pytest.raises(ValueError, match="not a multiple"):
    grpo.compute_advantages(jnp.zeros(7), GRPOConfig(n=4))
  with pytest.raises(ValueError, match="got shape"):
    grpo.compute_advantages(jnp.zeros((2, 3)), GRPOConfig(n=4))
  with pytest.raises(ValueError, match=r"baseline must be \[P\]"):
    grpo.compute_advantages(jnp.zeros(8), GRPOConfig(n=4, advantage="remax"), jnp.zeros(3))


# ----------------------------------------------------------------------------- KL estimators

def test_kl_estimators_exact_expectations_on_a_categorical():
  # Expectation under pi of each per-token estimate, summed over the whole support:
  # k1 and k3 are unbiased for KL(pi || ref); k2's mean is E[(log pi - log ref)^2] / 2.
  p = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
  q = np.array([0.3, 0.3, 0.2, 0.1, 0.1])
  log_ratio = np.log(p) - np.log(q)
  kl = np.sum(p * log_ratio)
  logp, logq = jnp.log(jnp.asarray(p))[None], jnp.log(jnp.asarray(q))[None]
  for name, expected in [("kl", kl), ("low_var_kl", kl), ("mse", 0.5 * np.sum(p * log_ratio**2))]:
    estimate = grpo.get_kl_estimator(name)(logp, logq)[0]
    np.testing.assert_allclose(np.sum(p * np.asarray(estimate)), expected, rtol=1e-5)


def test_kl_estimators_monte_carlo_match_gaussian_closed_form():
  # KL(N(m1, s1^2) || N(m2, s2^2)) = log(s2 / s1) + (s1^2 + (m1 - m2)^2) / (2 s2^2) - 1/2.
  m1, s1, m2, s2 = 0.0, 1.0, 0.5, 1.2
  closed = np.log(s2 / s1) + (s1**2 + (m1 - m2)**2) / (2 * s2**2) - 0.5
  x = np.random.default_rng(0).normal(m1, s1, size=400_000)
  log_density = lambda x, m, s: -0.5 * ((x - m) / s)**2 - np.log(s) - 0.5 * np.log(2 * np.pi)
  logp = jnp.asarray(log_density(x, m1, s1))[None]
  logq = jnp.asarray(log_density(x, m2, s2))[None]
  k1 = np.asarray(grpo.get_kl_estimator("kl")(logp, logq))
  k3 = np.asarray(grpo.get_kl_estimator("low_var_kl")(logp, logq))
  np.testing.assert_allclose(k1.mean(), closed, atol=5e-3)
  np.testing.assert_allclose(k3.mean(), closed, atol=5e-3)
  assert (k3 >= 0).all()
  # Between close policies (the regime of a KL penalty) k3 has far lower variance than k1.
  logq_close = jnp.asarray(log_density(x, 0.1, 1.0))[None]
  k1_close = np.asarray(grpo.get_kl_estimator("kl")(logp, logq_close))
  k3_close = np.asarray(grpo.get_kl_estimator("low_var_kl")(logp, logq_close))
  np.testing.assert_allclose(k3_close.mean(), 0.1**2 / 2, atol=2e-4)
  assert k3_close.std() < 0.2 * k1_close.std()


def test_kl_estimator_values_gradients_and_clamp():
  logp = jnp.array([[-1.0, -2.0, -0.5, -30.0]])
  ref = jnp.array([[-1.5, -1.0, -0.5, -1.0]])
  d = np.asarray(ref - logp)[0]
  expected = {"kl": -d, "mse": 0.5 * d**2,
              "low_var_kl": np.minimum(np.exp(np.minimum(d, 20)) - np.minimum(d, 20) - 1, 10)}
  grads = {"kl": np.ones(4), "mse": -d, "low_var_kl": np.array(
      [1 - np.exp(d[0]), 1 - np.exp(d[1]), 0.0, 0.0])}  # the clamped token has no gradient
  for name in expected:
    fn = grpo.get_kl_estimator(name)
    value, grad = jax.jit(jax.value_and_grad(lambda lp: fn(lp, ref)[0].sum()))(logp)
    np.testing.assert_allclose(fn(logp, ref)[0], expected[name], rtol=1e-5)
    np.testing.assert_allclose(value, expected[name].sum(), rtol=1e-5)
    np.testing.assert_allclose(grad[0], grads[name], rtol=1e-5, atol=1e-6)
  assert float(grpo.get_kl_estimator("low_var_kl")(logp, ref)[0, 3]) == 10.0


# ----------------------------------------------------------------------------- config, metrics

def test_config_defaults_are_the_papers():
  cfg = GRPOConfig()
  assert (cfg.n, cfg.temperature, cfg.top_p, cfg.eps_low, cfg.eps_high, cfg.dual_clip) == (
      8, 1.0, 0.99, 0.2, 0.3, 3.0)
  assert (cfg.kl_coef, cfg.kl_estimator, cfg.advantage, cfg.loss_agg) == (
      0.01, "low_var_kl", "grpo", "token_mean")
  assert (cfg.lr, cfg.weight_decay, cfg.grad_clip, cfg.warmup_steps, cfg.ppo_epochs) == (
      1e-6, 0.01, 1.0, 0, 1)
  assert (cfg.rollout_batch_size, cfg.update_batch_size, cfg.adv_eps) == (512, 128, 1e-6)
  assert (cfg.max_prompt_length, cfg.max_response_length, cfg.reward) == (4096, 1024, "cot_boxed")
  assert cfg.kl_enabled and not GRPOConfig(use_kl=False).kl_enabled
  hash(cfg)  # static argument of jit


@pytest.mark.parametrize("field,value,message", [
    ("n", 1, "n must be >= 2"),
    ("n", 0, "n .responses per prompt. must be >= 1"),
    ("temperature", 0.0, "temperature must be > 0"),
    ("top_p", 1.5, "top_p must be in"),
    ("eps_low", 1.0, "eps_low must be in"),
    ("eps_high", -0.1, "eps_high must be >= 0"),
    ("dual_clip", 1.0, "dual_clip must be > 1"),
    ("kl_coef", -1.0, "kl_coef must be >= 0"),
    ("kl_estimator", "k9", "unknown kl_estimator 'k9'"),
    ("advantage", "ppo", "unknown advantage 'ppo'"),
    ("loss_agg", "sum", "unknown loss_agg 'sum'"),
    ("reward", "bleu", "unknown reward 'bleu'"),
    ("update_batch_size", 100, "not a multiple of update_batch_size"),
    ("lr", 0.0, "lr must be > 0"),
])
def test_config_validation(field, value, message):
  with pytest.raises(ValueError, match=message):
    GRPOConfig(**{field: value})


def test_remax_accepts_a_single_response():
  assert GRPOConfig(n=1, advantage="remax").n == 1


def test_group_metrics_by_hand():
  # Group 1 population variance 0.75 / 4 = 0.1875, group 2 zero; mean (3 + 0.4) / 8.
  metrics = grpo.group_metrics(jnp.asarray(REWARDS.reshape(-1)), 4)
  np.testing.assert_allclose(metrics["reward_mean"], 3.4 / 8, rtol=1e-6)
  np.testing.assert_allclose(metrics["reward_var_within"], 0.1875 / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["zero_var_frac"], 0.5)
  with pytest.raises(ValueError, match="got shape"):
    grpo.group_metrics(jnp.zeros(7), 4)
