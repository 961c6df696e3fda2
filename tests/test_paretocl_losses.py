"""ER and ParetoCL losses against hand-computed values."""
from __future__ import annotations

import math

import cpt_jax  # noqa: F401
import jax.numpy as jnp
import numpy as np

from cpt_jax.paretocl import losses


def _ce(logits, label):
  return math.log(sum(math.exp(v) for v in logits)) - logits[label]


def test_masked_cross_entropy_by_hand():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
  value = losses.masked_cross_entropy(logits, jnp.array([0, 0, 1]), jnp.array([1, 1, 0]))
  np.testing.assert_allclose(value, (_ce([2, 0], 0) + _ce([0, 1], 0)) / 2, rtol=1e-6)
  assert float(losses.masked_cross_entropy(logits, jnp.array([0, 0, 1]), jnp.zeros(3))) == 0.0


def test_er_loss_by_hand():
  # Mean over the concatenated valid stream + replay rows (mammoth's ER), not L_new + L_replay.
  new = jnp.array([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
  replay = jnp.array([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])
  loss, aux = losses.er_loss(new, jnp.array([2, 0]), jnp.array([1, 1]), replay, jnp.array([1, 0]),
                             jnp.array([1, 1]))
  rows = [_ce([1, 0, 0], 2), _ce([0, 0, 3], 0), _ce([0, 2, 0], 1), _ce([0, 0, 0], 0)]
  np.testing.assert_allclose(loss, sum(rows) / 4, rtol=1e-6)
  np.testing.assert_allclose(aux["loss_new"], (rows[0] + rows[1]) / 2, rtol=1e-6)
  np.testing.assert_allclose(aux["loss_replay"], (rows[2] + rows[3]) / 2, rtol=1e-6)
  # Same scale as ParetoCL at the preference (0.5, 0.5) with full batches of equal size.
  pareto, _ = losses.paretocl_loss(jnp.array([[0.5, 0.5]]), new[None], jnp.array([2, 0]),
                                   jnp.array([1, 1]), replay[None], jnp.array([1, 0]),
                                   jnp.array([1, 1]))
  np.testing.assert_allclose(loss, pareto, rtol=1e-6)
  # Empty buffer (no valid replay row) and a padded stream row: the mean over the valid rows.
  loss, _ = losses.er_loss(new, jnp.array([2, 0]), jnp.array([1, 0]), replay, jnp.array([1, 0]),
                           jnp.array([0, 0]))
  np.testing.assert_allclose(loss, rows[0], rtol=1e-6)


def test_paretocl_loss_by_hand():
  alphas = jnp.array([[0.25, 0.75], [1.0, 0.0]])  # (replay, new)
  logits_new = jnp.array([[[1.0, 0.0]], [[0.0, 3.0]]])  # [K=2, B=1, C=2]
  logits_replay = jnp.array([[[0.0, 0.0], [2.0, 1.0]], [[1.0, 1.0], [0.0, 4.0]]])  # [2, 2, 2]
  loss, _ = losses.paretocl_loss(alphas, logits_new, jnp.array([1]), jnp.array([1]),
                                 logits_replay, jnp.array([0, 1]), jnp.array([1, 0]))
  # The second replay row is masked out: L_replay(k) = CE of the first row only.
  k0 = 0.25 * _ce([0, 0], 0) + 0.75 * _ce([1, 0], 1)
  k1 = 1.0 * _ce([1, 1], 0) + 0.0 * _ce([0, 3], 1)
  np.testing.assert_allclose(loss, (k0 + k1) / 2, rtol=1e-6)
