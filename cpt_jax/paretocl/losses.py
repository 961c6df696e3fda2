"""Losses of experience replay (ER) and ParetoCL on masked batches."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean cross-entropy over rows where mask is set; logits [..., B, C], labels/mask [B] -> [...].

  An all-zero mask gives 0 (e.g. replay before the buffer holds anything).
  """
  per_example = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.broadcast_to(labels, logits.shape[:-1]))  # [..., B]
  mask = mask.astype(per_example.dtype)
  return jnp.sum(per_example * mask, axis=-1) / jnp.maximum(jnp.sum(mask), 1.0)


def er_loss(logits_new: jax.Array, labels_new: jax.Array, mask_new: jax.Array,
            logits_replay: jax.Array, labels_replay: jax.Array, mask_replay: jax.Array
            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Experience replay with one plain head (logits [B, C]): mean cross-entropy over the
  concatenated stream + replay rows, as mammoth's ER computes it.

  With full batches of equal size this is 0.5 L_new + 0.5 L_replay, the same loss scale as
  ParetoCL at the preference (0.5, 0.5); while the buffer is empty it is L_new.
  """
  per_new = optax.softmax_cross_entropy_with_integer_labels(logits_new, labels_new)  # [B]
  per_replay = optax.softmax_cross_entropy_with_integer_labels(logits_replay, labels_replay)
  mask_new = mask_new.astype(per_new.dtype)
  mask_replay = mask_replay.astype(per_replay.dtype)
  count = jnp.maximum(jnp.sum(mask_new) + jnp.sum(mask_replay), 1.0)
  loss = (jnp.sum(per_new * mask_new) + jnp.sum(per_replay * mask_replay)) / count
  return loss, {"loss_new": masked_cross_entropy(logits_new, labels_new, mask_new),
                "loss_replay": masked_cross_entropy(logits_replay, labels_replay, mask_replay)}


def paretocl_loss(alphas: jax.Array, logits_new: jax.Array, labels_new: jax.Array,
                  mask_new: jax.Array, logits_replay: jax.Array, labels_replay: jax.Array,
                  mask_replay: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(1/K) sum_k [alpha_k,replay L_replay(alpha_k) + alpha_k,new L_new(alpha_k)].

  alphas [K, 2] ordered (replay, new); logits [K, B, C] from the K generated heads.
  """
  loss_new = masked_cross_entropy(logits_new, labels_new, mask_new)  # [K]
  loss_replay = masked_cross_entropy(logits_replay, labels_replay, mask_replay)  # [K]
  loss = jnp.mean(alphas[:, 0] * loss_replay + alphas[:, 1] * loss_new)
  return loss, {"loss_new": jnp.mean(loss_new), "loss_replay": jnp.mean(loss_replay)}
