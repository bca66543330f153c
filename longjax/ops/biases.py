"""Attention logit biases computed one block at a time from explicit positions.

A bias is a pytree with a `block(q_start, q_size, kv_start, kv_size)` method returning float32
logits to add, shape [B or 1, N or 1, q_size, kv_size]; implementations evaluate it per block, so a
`[T, S]` bias never exists outside a block. Biases here carry no trainable parameters: their arrays
are treated as constants by `dot_product_attention` (zero gradients, also under the blockwise
custom VJP). Learned biases (T5 buckets and friends) come with their own parameter handling later.
"""

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from longjax.ops.masks import take_block


class BlockBias(Protocol):
  """What attention implementations need from a bias."""

  def block(self, q_start, q_size: int, kv_start, kv_size: int) -> jax.Array:
    """Float32 bias for queries [q_start, +q_size) x keys [kv_start, +kv_size).

    Returns:
      f32 [B or 1, N or 1, q_size, kv_size]; rows/keys past the real lengths may hold anything
      finite (they are masked by the `AttentionMask`).
    """
    ...


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["slopes", "q_positions", "kv_positions"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class AlibiBias:
  """ALiBi: logits get `-slopes[n] * |q_positions[b, t] - kv_positions[b, s]|`.

  Positions are explicit so that evaluation can shift, clamp or restart them without touching the
  model; the slopes are constants (see the module docstring).

  Attributes:
    slopes: [N] float32, one per query head.
    q_positions: [B, T] int32.
    kv_positions: [B, S] int32.
  """

  slopes: jax.Array
  q_positions: jax.Array
  kv_positions: jax.Array

  def block(self, q_start, q_size: int, kv_start, kv_size: int) -> jax.Array:
    """Bias for queries [q_start, +q_size) x keys [kv_start, +kv_size).

    Args:
      q_start: int32 scalar (may be traced).
      q_size: static block height; rows past T repeat the last position (masked anyway).
      kv_start: int32 scalar (may be traced).
      kv_size: static block width; keys past S repeat the last position.

    Returns:
      f32 [B, N, q_size, kv_size].
    """
    q_pos = take_block(self.q_positions, q_start, q_size)
    kv_pos = take_block(self.kv_positions, kv_start, kv_size)
    # Subtract in int32 before converting: exact for any position, unlike f32 positions.
    distance = jnp.abs(q_pos[:, :, None] - kv_pos[:, None, :]).astype(jnp.float32)
    slopes = jnp.asarray(self.slopes, jnp.float32)
    return -slopes[None, :, None, None] * distance[:, None]
