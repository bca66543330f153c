"""Attention logit biases computed one block at a time from explicit positions.

A bias is a pytree with a `block(q_start, q_size, kv_start, kv_size)` method returning float32
logits to add, shape [B or 1, N or 1, q_size, kv_size]; implementations evaluate it per block, so a
`[T, S]` bias never exists outside a block. Its floating-point arrays are differentiable in every
implementation of `dot_product_attention` (the blockwise custom VJP pulls each block's logits
gradient back through `block`), its integer arrays (positions) are not. So a learned bias is just
a spec whose fields are the parameters: the NNX modules in `longjax.layers.positional_bias` build
these specs from their `nnx.Param`s (after any positivity transform) on every call.

`block` must be finite, with finite derivatives, everywhere, including entries the mask hides
and rows/keys past the real lengths: a hidden entry gets a zero cotangent, and 0 * NaN is NaN.

The maths of each bias is a pure function in `longjax.posenc`; a spec only slices positions to
the block and calls it.
"""

import dataclasses
import functools
from typing import Protocol

import jax
import jax.numpy as jnp

from longjax.ops.masks import take_block
from longjax.posenc import relative_bias


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
  model. The slopes are differentiable like any float field, but `AlibiPositions` builds them
  from the head count at every call (they are not parameters), so in the models they are the
  paper's constants.

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


def _block_positions(bias, q_start, q_size: int, kv_start, kv_size: int):
  """The block's query positions [B, q_size] and key positions [B, kv_size].

  Rows/keys past the real lengths repeat the last position (`take_block`): finite, and masked.
  """
  return (take_block(bias.q_positions, q_start, q_size),
          take_block(bias.kv_positions, kv_start, kv_size))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["table", "q_positions", "kv_positions"],
    meta_fields=["max_distance", "bidirectional"],
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Bias:
  """T5 relative bias: logits get `table[bucket(q_positions[b, t] - kv_positions[b, s]), n]`.

  See `longjax.posenc.relative_bias.t5_bias`.

  Attributes:
    table: [num_buckets, N] float32, learned.
    q_positions: [B, T] int32.
    kv_positions: [B, S] int32.
    max_distance: static; distances at or beyond it share the last bucket.
    bidirectional: static; separate buckets for keys after the query.
  """

  table: jax.Array
  q_positions: jax.Array
  kv_positions: jax.Array
  max_distance: int = 128
  bidirectional: bool = False

  def block(self, q_start, q_size: int, kv_start, kv_size: int) -> jax.Array:
    """f32 [B, N, q_size, kv_size] (arguments as for `AlibiBias.block`)."""
    q_pos, kv_pos = _block_positions(self, q_start, q_size, kv_start, kv_size)
    return relative_bias.t5_bias(self.table, q_pos, kv_pos, max_distance=self.max_distance,
                                 bidirectional=self.bidirectional)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["r1", "r2", "q_positions", "kv_positions"],
    meta_fields=["kind"],
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class KerpleBias:
  """KERPLE: logits get `-r1[n] log(1 + r2[n] |i - j|)` ("log") or `-r1[n] |i - j|^r2[n]`.

  See `longjax.posenc.relative_bias.kerple_bias`.

  Attributes:
    r1: [N] float32, positive.
    r2: [N] float32, positive (and <= 2 for "power").
    q_positions: [B, T] int32.
    kv_positions: [B, S] int32.
    kind: static; "log" or "power".
  """

  r1: jax.Array
  r2: jax.Array
  q_positions: jax.Array
  kv_positions: jax.Array
  kind: str = "log"

  def block(self, q_start, q_size: int, kv_start, kv_size: int) -> jax.Array:
    """f32 [B, N, q_size, kv_size] (arguments as for `AlibiBias.block`)."""
    q_pos, kv_pos = _block_positions(self, q_start, q_size, kv_start, kv_size)
    return relative_bias.kerple_bias(self.r1, self.r2, q_pos, kv_pos, kind=self.kind)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "q_positions", "kv_positions"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class FireBias:
  """FIRE: logits get `f(psi(i - j) / psi(max(L, i)))[n]` with a learned MLP f.

  See `longjax.posenc.relative_bias.fire_bias`.

  Attributes:
    params: `FireParams` (c and threshold positive).
    q_positions: [B, T] int32.
    kv_positions: [B, S] int32.
  """

  params: relative_bias.FireParams
  q_positions: jax.Array
  kv_positions: jax.Array

  def block(self, q_start, q_size: int, kv_start, kv_size: int) -> jax.Array:
    """f32 [B, N, q_size, kv_size] (arguments as for `AlibiBias.block`)."""
    q_pos, kv_pos = _block_positions(self, q_start, q_size, kv_start, kv_size)
    return relative_bias.fire_bias(self.params, q_pos, kv_pos)
