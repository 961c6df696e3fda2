"""ResNet backbones, the preference hypernetwork and min-entropy selection."""
from __future__ import annotations

import cpt_jax  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cpt_jax.paretocl import hypernet, resnet


def _reference_resnet18_params(nf: int, in_ch: int = 3) -> int:
  """Parameter count of a CIFAR ResNet-18 (3x3 stem, BasicBlocks [2,2,2,2]) without head."""
  conv = lambda k, cin, cout: k * k * cin * cout
  bn = lambda c: 2 * c
  total = conv(3, in_ch, nf) + bn(nf)
  cin = nf
  for stage in range(4):
    cout = nf * 2**stage
    for block in range(2):
      total += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
      if cin != cout:
        total += conv(1, cin, cout) + bn(cout)
      cin = cout
  return total


def _param_count(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("nf, features", [(20, 160), (64, 512)])
def test_resnet18_features_and_size(nf, features):
  model = nnx.eval_shape(lambda: resnet.resnet18(nf, rngs=nnx.Rngs(0)))
  assert model.num_features == features
  assert _param_count(model) == _reference_resnet18_params(nf)
  if nf == 64:  # the widely quoted 11,173,962 includes a 10-class linear head (5,130)
    assert _param_count(model) + 512 * 10 + 10 == 11_173_962


@pytest.fixture(scope="module")
def tiny_resnet():
  # rbg keys: initializers compile several times faster than with threefry on CPU.
  rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
  return resnet.ResNet(nf=4, blocks_per_stage=(1, 1, 1, 1), rngs=rngs)


def test_batchnorm_train_vs_eval(tiny_resnet):
  model = nnx.clone(tiny_resnet)
  x = jax.random.normal(jax.random.key(1), (6, 16, 16, 3)) * 3.0 + 1.0
  stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
  # Eval: running statistics, so a sample's output does not depend on its batch-mates.
  full = model(x, train=False)
  alone = model(x[:2], train=False)
  np.testing.assert_allclose(full[:2], alone, rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, stats_before,
               jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)))
  # Train: batch statistics (outputs depend on the batch) and running averages move.
  train_full = model(x, train=True)
  train_alone = model(x[:2], train=True)
  assert not np.allclose(train_full[:2], train_alone, atol=1e-3)
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), stats_before,
                       jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)))
  assert all(jax.tree.leaves(moved))


def test_stem_batchnorm_uses_batch_statistics_in_training(tiny_resnet):
  model = nnx.clone(tiny_resnet)
  x = jax.random.normal(jax.random.key(2), (8, 8, 8, 3))
  y = model.stem_bn(model.stem_conv(x), use_running_average=False)  # scale 1, bias 0 at init
  np.testing.assert_allclose(np.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(np.var(y, axis=(0, 1, 2)), 1.0, atol=1e-2)


@pytest.fixture(scope="module")
def head():
  return hypernet.HyperHead(num_features=6, num_classes=4, hidden=16, num_hidden_layers=3,
                            rngs=nnx.Rngs(jax.random.key(3, impl="rbg")))


def test_hypernet_shapes_and_alpha_dependence(head):
  alphas = jnp.array([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]])
  generated = head.hypernet(alphas)
  assert generated["kernel"].shape == (3, 6, 4) and generated["bias"].shape == (3, 4)
  assert len(head.hypernet.trunk) == 3
  for i in range(3):
    for j in range(i + 1, 3):
      assert not np.allclose(generated["kernel"][i], generated["kernel"][j])
  features = jax.random.normal(jax.random.key(4), (5, 6))
  logits = head(features, alphas)
  assert logits.shape == (3, 5, 4)
  for k in range(3):  # logits = h(x) W(alpha_k) + b(alpha_k)
    np.testing.assert_allclose(
        logits[k], features @ generated["kernel"][k] + generated["bias"][k], rtol=1e-5, atol=1e-6)


def test_generic_hypernet_outputs():
  net = hypernet.PreferenceHypernet({"a": (2, 3), "scale": ()}, num_objectives=3, hidden=8,
                                    rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
  out = net(jnp.ones((7, 3)) / 3)
  assert out["a"].shape == (7, 2, 3) and out["scale"].shape == (7,)
  with pytest.raises(ValueError, match="objectives"):
    net(jnp.ones((7, 2)))


def test_preferences_on_simplex():
  alphas = hypernet.sample_preferences(jax.random.key(0, impl="rbg"), 2000)
  assert alphas.shape == (2000, 2)
  np.testing.assert_allclose(alphas.sum(-1), 1.0, rtol=1e-6)
  assert np.all(alphas >= 0)
  # Dirichlet(1, 1) is uniform on the simplex: alpha_new ~ U(0, 1).
  assert abs(float(alphas[:, 1].mean()) - 0.5) < 0.03
  assert abs(float(alphas[:, 1].var()) - 1 / 12) < 0.01
  sweep = hypernet.preference_sweep(21)
  np.testing.assert_allclose(sweep[0], [1, 0]) and np.testing.assert_allclose(sweep[-1], [0, 1])
  np.testing.assert_allclose(sweep[10], [0.5, 0.5], atol=1e-6)


def test_min_entropy_select_matches_bruteforce():
  logits = np.asarray(jax.random.normal(jax.random.key(5), (20, 64, 7)) * 3)
  pred, chosen = hypernet.min_entropy_select(jnp.asarray(logits))
  for b in range(64):
    entropies = []
    for k in range(20):
      p = np.exp(logits[k, b] - logits[k, b].max())
      p /= p.sum()
      entropies.append(-np.sum(p * np.log(p)))
    best = int(np.argmin(entropies))
    assert chosen[b] == best
    assert pred[b] == int(np.argmax(logits[best, b]))
