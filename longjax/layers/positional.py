"""Positional-encoding modules and their registry (`model.posenc.kind`).

A positional encoding acts at one or both of two places:
  * the input: added to the token embeddings once (learned, sinusoidal);
  * every attention layer: rotating queries and keys (rope) and/or adding a logits bias (alibi).
Each registry entry names a factory for each place (None where the encoding does not act there).
The maths lives in `longjax.posenc`; these modules only hold parameters and dimensions.
"""

from collections.abc import Callable
import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from longjax import posenc
from longjax.layers import params
from longjax.ops import AlibiBias


class InputPositions(nnx.Module):
  """Base of absolute encodings: `__call__(x [B, T, D], positions [B, T]) -> [B, T, D]`."""


class SinusoidalPositions(InputPositions):

  def __init__(self, width: int):
    self.width = width

  def __call__(self, x, positions):
    return x + posenc.sinusoidal_encoding(positions, self.width).astype(x.dtype)


class LearnedPositions(InputPositions):
  """A learned [max_length, D] table.

  Positions at or beyond `max_length` have no row of their own and are clamped to the last row:
  evaluating beyond the table is allowed (it is what a length-extrapolation study measures) but
  cannot be expected to work.
  """

  def __init__(self, max_length: int, width: int, *, rngs: nnx.Rngs):
    self.table = params.param(rngs, params.normal(width**-0.5), (max_length, width),
                              (params.POSITIONS, params.EMBED))
    self.max_length = max_length

  def __call__(self, x, positions):
    rows = jnp.clip(positions, 0, self.max_length - 1)
    return x + jnp.take(self.table.value, rows, axis=0).astype(x.dtype)


class AttentionPositions(nnx.Module):
  """Per-attention-layer encoding. The default acts nowhere (NoPE)."""

  def rotate(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Queries [B, T, N, H] or keys [B, S, K, H] at their positions [B, T]."""
    del positions
    return x

  def bias(self, q_positions: jax.Array, kv_positions: jax.Array):
    """A logits bias spec for `longjax.ops.dot_product_attention`, or None."""
    del q_positions, kv_positions
    return None


class NoPositions(AttentionPositions):
  pass


class RotaryPositions(AttentionPositions):

  def __init__(self, head_dim: int, theta: float):
    self.head_dim = head_dim
    self.theta = theta

  def rotate(self, x, positions):
    return posenc.apply_rope(x, positions, posenc.rope_inv_freq(self.head_dim, self.theta))


class AlibiPositions(AttentionPositions):

  def __init__(self, num_heads: int):
    self.slopes = posenc.alibi_slopes(num_heads)

  def bias(self, q_positions, kv_positions):
    return AlibiBias(jnp.asarray(self.slopes), q_positions, kv_positions)


@dataclasses.dataclass(frozen=True)
class PosEncEntry:
  """Factories from (model config, rngs) to the modules of one encoding."""
  input: Callable[..., InputPositions] | None
  attention: Callable[..., AttentionPositions]


def _head_dim(cfg) -> int:
  return cfg.head_dim or cfg.width // cfg.num_heads


POSENCS: dict[str, PosEncEntry] = {
    "nope": PosEncEntry(None, lambda cfg, rngs: NoPositions()),
    "rope": PosEncEntry(None, lambda cfg, rngs: RotaryPositions(_head_dim(cfg),
                                                                cfg.posenc.rope_theta)),
    "alibi": PosEncEntry(None, lambda cfg, rngs: AlibiPositions(cfg.num_heads)),
    "sinusoidal": PosEncEntry(lambda cfg, rngs: SinusoidalPositions(cfg.width),
                              lambda cfg, rngs: NoPositions()),
    "learned": PosEncEntry(
        lambda cfg, rngs: LearnedPositions(cfg.posenc.max_length, cfg.width, rngs=rngs),
        lambda cfg, rngs: NoPositions()),
}
