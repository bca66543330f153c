"""Token-level cross-entropy with weights (padding and cross-document targets get weight 0)."""

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """-log p(target) per token.

  Args:
    logits: [B, T, V] (any float dtype; computed in float32).
    targets: [B, T] int32.

  Returns:
    [B, T] float32 losses in nats.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return log_z - target_logit


def weighted_cross_entropy(logits, targets, weights) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted losses, sum of weights), both float32 scalars."""
  losses = token_cross_entropy(logits, targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights)
