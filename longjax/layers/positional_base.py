"""The base classes of positional-encoding modules, apart so that imports run one way.

`longjax.layers.positional` (the registry and the rotary, absolute and ALiBi modules) and
`longjax.layers.positional_bias` (the learned logit biases) both subclass these; the registry
imports the learned biases, which import only this module.
"""

from flax import nnx
import jax


class InputPositions(nnx.Module):
  """Base of absolute encodings: `__call__(x [B, T, D], positions [B, T]) -> [B, T, D]`."""


class AttentionPositions(nnx.Module):
  """Per-attention-layer encoding. The default acts nowhere (NoPE)."""

  def rotate(self, x: jax.Array, positions: jax.Array, *, context_length: int | None = None,
             is_key: bool = False) -> jax.Array:
    """Queries [B, T, N, H] or keys [B, S, K, H] (`is_key`) at their positions [B, T].

    `context_length` is the decode cache's capacity when there is one (None otherwise): the
    length that length-dependent encodings (dynamic NTK) are computed for, so that keys cached
    by earlier steps and the current queries use the same frequencies. `is_key` matters to
    encodings that treat the two sides differently (xPos scales them in opposite directions).
    """
    del positions, context_length, is_key
    return x

  def bias(self, q_positions: jax.Array, kv_positions: jax.Array):
    """A logits bias spec for `longjax.ops.dot_product_attention`, or None."""
    del q_positions, kv_positions
    return None
