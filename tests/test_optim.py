from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from cpt_jax.train import optim


def config(**kw):
  c = ConfigDict(dict(name="sgd", lr=1.0, schedule="constant", warmup_ratio=0.0, b1=0.9,
                      b2=0.999, eps=1e-8, weight_decay=0.0, momentum=0.0, grad_clip_norm=None,
                      grad_accum_steps=1, freeze=()))
  c.update(kw)
  return c


def params():
  return {"visual": {"kernel": jnp.array([[1.0, -0.0], [2.0, 3.0]])},
          "visual_proj": {"kernel": jnp.array([1.0, 2.0])},
          "layers": [{"w": jnp.array([0.5, -0.5])}, {"w": jnp.array([4.0])}]}


def stepper(opt):
  return jax.jit(functools.partial(optim.apply_gradients_or_skip, optimizer=opt))


def grads_like(tree, value):
  return jax.tree.map(lambda x: jnp.full_like(x, value), tree)


def test_cosine_schedule_matches_hf_formula():
  total, lr = 50, 1e-5
  sched = optim.make_schedule(config(schedule="cosine", lr=lr, warmup_ratio=0.1), total)
  warm = math.ceil(0.1 * total)
  for step in (0, 1, 4, 5, 6, 27, 49, 50):
    if step < warm:
      want = lr * step / warm
    else:
      want = lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / (total - warm)))
    np.testing.assert_allclose(sched(step), want, rtol=1e-5, atol=1e-12)


def test_constant_schedule_and_errors():
  sched = optim.make_schedule(config(lr=2e-3, warmup_ratio=0.25), 8)
  np.testing.assert_allclose([sched(i) for i in (0, 1, 2, 7)], [0, 1e-3, 2e-3, 2e-3], rtol=1e-6)
  with pytest.raises(ValueError, match="schedule must be"):
    optim.make_schedule(config(schedule="linear"), 8)
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_schedule(config(), 0)
  with pytest.raises(ValueError, match="optim.name"):
    optim.make_optimizer(config(name="lion"), params(), 8)


def test_freeze_patterns_match_whole_path_components():
  mask = optim.trainable_mask(params(), ("visual",))
  assert mask == {"visual": {"kernel": False}, "visual_proj": {"kernel": True},
                  "layers": [{"w": True}, {"w": True}]}
  assert optim.trainable_mask(params(), (r"layers/\d+",))["layers"] == [{"w": False}, {"w": False}]
  assert optim.trainable_mask(params(), ("layers/1",))["layers"] == [{"w": True}, {"w": False}]
  with pytest.raises(ValueError, match=r"\['vision'\] match no parameter"):
    optim.trainable_mask(params(), ("visual", "vision"))


def test_frozen_params_stay_bit_identical_under_weight_decay():
  p = params()
  opt = optim.make_optimizer(
      config(name="adamw", lr=0.1, weight_decay=0.1, grad_clip_norm=1.0, freeze=("visual",)), p, 10)
  state = optim.create_train_state(p, opt, jax.random.PRNGKey(0))
  # Adam moments exist only for trainable params.
  assert sum(x.size for x in jax.tree.leaves(state.opt_state)) < 2 * sum(
      x.size for x in jax.tree.leaves(p)) + 2
  step = stepper(opt)
  for _ in range(3):
    state, info = step(state, grads_like(p, 1.0), jnp.float32(1.0))
  frozen = np.asarray(state.params["visual"]["kernel"])
  assert frozen.tobytes() == np.asarray(p["visual"]["kernel"]).tobytes()   # -0.0 kept
  assert not np.allclose(state.params["visual_proj"]["kernel"], p["visual_proj"]["kernel"])
  # The logged grad norm covers trainable gradients only (5 ones).
  np.testing.assert_allclose(info["grad_norm"], np.sqrt(5.0), rtol=1e-6)


def test_clipping_uses_trainable_gradients_only():
  p = params()
  opt = optim.make_optimizer(config(grad_clip_norm=1.0, freeze=("visual",)), p, 10)
  g = grads_like(p, 3.0)
  g["visual"]["kernel"] = jnp.full((2, 2), 1e6)   # frozen: must not shrink the others
  state, info = stepper(opt)(optim.create_train_state(p, opt, jax.random.PRNGKey(0)), g,
                             jnp.float32(0.0))
  norm = 3.0 * np.sqrt(5.0)
  np.testing.assert_allclose(info["grad_norm"], norm, rtol=1e-6)
  np.testing.assert_allclose(state.params["layers"][1]["w"], 4.0 - 3.0 / norm, rtol=1e-6)


def test_non_finite_gradient_skips_and_frozen_nan_does_not():
  p = params()
  opt = optim.make_optimizer(config(name="adamw", lr=0.1, freeze=("visual",)), p, 10)
  step = stepper(opt)
  state = optim.create_train_state(p, opt, jax.random.PRNGKey(0))
  g = grads_like(p, 1.0)
  g["layers"][0]["w"] = jnp.array([1.0, jnp.inf])
  new, info = step(state, g, jnp.float32(1.0))
  assert int(info["skipped"]) == 1 and int(new.skipped) == 1 and int(new.step) == 1
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                  jax.tree.leaves((new.params, new.opt_state))):
    np.testing.assert_array_equal(a, b)
  g = grads_like(p, 1.0)
  g["visual"]["kernel"] = jnp.full((2, 2), jnp.nan)
  new, info = step(new, g, jnp.float32(1.0))
  assert int(info["skipped"]) == 0 and int(new.skipped) == 1 and int(new.step) == 2
  _, info = step(new, grads_like(p, 1.0), jnp.float32(jnp.nan))
  assert int(info["skipped"]) == 1


def test_gradient_accumulation_equals_mean_gradient():
  p = params()
  acc = optim.make_optimizer(config(lr=0.5, grad_accum_steps=2), p, 10)
  one = optim.make_optimizer(config(lr=0.5), p, 10)
  g1, g2 = grads_like(p, 1.0), grads_like(p, 3.0)
  step = stepper(acc)
  s = optim.create_train_state(p, acc, jax.random.PRNGKey(0))
  s, _ = step(s, g1, jnp.float32(0.0))
  np.testing.assert_array_equal(s.params["layers"][1]["w"], p["layers"][1]["w"])  # no update yet
  s, _ = step(s, g2, jnp.float32(0.0))
  ref, _ = stepper(one)(optim.create_train_state(p, one, jax.random.PRNGKey(0)),
                        grads_like(p, 2.0), jnp.float32(0.0))
  for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_lr_follows_optimizer_updates_with_accumulation_and_skips():
  p = params()
  opt = optim.make_optimizer(config(schedule="cosine", warmup_ratio=0.5, grad_accum_steps=2), p, 4)
  step = stepper(opt)
  s = optim.create_train_state(p, opt, jax.random.PRNGKey(0))
  lrs = []
  for loss in (0.0, 0.0, jnp.nan, 0.0, 0.0):
    s, info = step(s, grads_like(p, 1.0), jnp.float32(loss))
    lrs.append(float(info["lr"]))
  # micro-steps 0,1 -> update 0; skipped batch; micro-steps 2,3 -> update 1.
  np.testing.assert_allclose(lrs, [0.0, 0.0, 0.5, 0.5, 0.5], atol=1e-7)


def test_state_shardings_follow_params():
  p = params()
  opt = optim.make_optimizer(
      config(name="adamw", grad_accum_steps=2, freeze=("visual",)), p, 10)
  abstract = jax.eval_shape(lambda: optim.create_train_state(p, opt, jax.random.PRNGKey(0)))
  mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
  rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("fsdp"))
  param_sh = jax.tree.map(lambda _: rep, p)
  param_sh["layers"][0]["w"] = split
  sh = optim.state_shardings(abstract, param_sh, rep)
  assert jax.tree.structure(sh) == jax.tree.structure(abstract)
  n_split = sum(s == split for s in jax.tree.leaves(sh.opt_state))
  assert n_split == 3   # Adam mu, nu and the accumulated gradient of layers/0/w
