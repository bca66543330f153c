"""Tile maths of the landmark grouped-softmax kernels, shared by the TPU and GPU variants.

Positions are in the *block-padded layout*: landmark block b (original positions
[b * Lb, (b + 1) * Lb), its landmark last) sits at layout positions [b * Lp, (b + 1) * Lp) with
Lp >= Lb and the Lp - Lb tail hidden. A key tile holds whole blocks (block_k % Lp == 0), so each
block's within-block softmax is complete inside one tile and needs no state across tiles.

The grouped softmax as one ordinary softmax. For a query i with main log-sum-exp M (over the
current block's keys and the earlier landmarks), the final weight of a regular key j of an earlier
block g is exp(x_L - M) * exp(x_j - lse_g) = exp(z_j - M) with the *shifted logit*
z_j = x_j + (x_L - lse_g), where x_L is the landmark's logit and lse_g the log-sum-exp of the
block's regular logits. Summed over the block these weights give exp(x_L - M), the landmark's
main probability; so M is exactly the log-sum-exp of z over {current-block keys, earlier regular
keys}, and the flash attention online update runs unchanged on z. Landmark columns get weight 0
(their values are never read, as in the paper). Per tile this costs a few masked reductions per
block on top of flash attention's work.
"""

import typing

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.flash.tiles import dot_nn
from kernels_pallas.flash.tiles import dot_nt
from kernels_pallas.flash.tiles import MASK_VALUE


class LandmarkSpec(typing.NamedTuple):
  """Static description of one call (hashable: kernels close over it).

  Attributes:
    landmark_block: Lb, tokens per landmark block including its landmark (>= 2).
    block_pad: Lp, the layout stride of a block (>= Lb; block_k % Lp == 0).
    length: real sequence length T.
    block_q: query rows per tile.
    block_k: keys per tile.
    scale: multiplies q.k.
    has_segments: the kernels take segment ids (packed documents): a query sees keys of its
      own document only, and an earlier block only through regular keys and a landmark of it.
  """

  landmark_block: int
  block_pad: int
  length: int
  block_q: int
  block_k: int
  scale: float
  has_segments: bool = False

  @property
  def groups(self) -> int:
    """Landmark blocks per key tile."""
    return self.block_k // self.block_pad


def last_kv_tile(spec: LandmarkSpec, q_tile, num_kv_tiles: int):
  """Last key tile a causal query tile sees (int32 scalar in kernels)."""
  last = lax.div((q_tile + 1) * spec.block_q - 1, jnp.int32(spec.block_k))
  return jnp.minimum(last, num_kv_tiles - 1)


def first_q_tile(spec: LandmarkSpec, kv_tile):
  """First query tile that sees any key of a key tile."""
  return lax.div(kv_tile * spec.block_k, jnp.int32(spec.block_q))


class TileTerms(typing.NamedTuple):
  """What the forward and backward passes need of one tile (see `tile_terms`)."""

  z: jax.Array  # shifted logits; -inf off {current keys, earlier regular keys}
  e: jax.Array  # exp(x - block max) on earlier regular keys, else 0
  current: jax.Array  # bool: a visible key of the query's own block
  landmark: jax.Array  # bool: the key is the landmark of a block earlier than the query's
  group_masks: list  # per block of the tile, bool masks of its columns (None: one block)
  group_sums: list  # per block, [rows] sum of e over the block (0: nothing visible)


def _reduce(x, kaxis, op):
  return op(x, axis=kaxis, keepdims=True)


def tile_terms(spec: LandmarkSpec, x, *, q_start, kv_tile, transposed=False,
               segment_visible=None) -> TileTerms:
  """Masks and shifted logits of a tile of logits `x` (f32, already scaled).

  Args:
    spec: the static spec.
    x: [bq, bk] logits, or [bk, bq] when `transposed` (keys on axis 0, as in the dK/dV kernel).
    q_start: layout position of the tile's first query row (int32 scalar).
    kv_tile: index of the key tile (int32 scalar); its first key is at kv_tile * block_k.
    transposed: the tile is keys x queries.
    segment_visible: bool, broadcastable to x: query and key in the same document; None: one
      document. A block's other documents' keys drop out of its within-block softmax, and its
      landmark counts only for the landmark's own document.
  """
  kaxis, qaxis = (0, 1) if transposed else (1, 0)
  shape = x.shape
  lb, lp, groups = spec.landmark_block, spec.block_pad, spec.groups
  col = lax.broadcasted_iota(jnp.int32, shape, kaxis)
  qpos = q_start + lax.broadcasted_iota(jnp.int32, shape, qaxis)
  # Block of each key within the tile, by comparisons (no vector integer division on TPU).
  group = jnp.zeros(shape, jnp.int32)
  for g in range(1, groups):
    group = group + jnp.where(col >= g * lp, 1, 0)
  offset = col - group * lp  # position inside the block; >= Lb is layout padding
  block = kv_tile * groups + group
  inside = block * lb + offset < spec.length  # not past the real sequence
  regular = inside & (offset < lb - 1)
  landmark = inside & (offset == lb - 1)
  if segment_visible is not None:
    regular, landmark = regular & segment_visible, landmark & segment_visible
  block_end = (block + 1) * lp
  earlier = qpos >= block_end  # the key's block ends before the query
  # The current block: causal, and the query's own landmark is never seen (not even by itself).
  current = regular & (qpos >= kv_tile * spec.block_k + col) & (qpos < block_end)
  earlier_regular = regular & earlier
  landmark = landmark & earlier

  xe = jnp.where(earlier_regular, x, -jnp.inf)
  masks = [None] if groups == 1 else [group == g for g in range(groups)]

  def per_group(values, fill, op):
    return [_reduce(values if m is None else jnp.where(m, values, fill), kaxis, op)
            for m in masks]

  def broadcast(per):  # per-block row values -> the columns of each block
    if groups == 1:
      return jnp.broadcast_to(per[0], shape)
    out = jnp.broadcast_to(per[-1], shape)
    for m, value in zip(masks[:-1], per[:-1]):
      out = jnp.where(m, value, out)
    return out

  # Block maxima stabilise exp(); MASK_VALUE keeps them finite for blocks the row cannot see.
  maxima = [jnp.maximum(m, MASK_VALUE) for m in per_group(xe, -jnp.inf, jnp.max)]
  e = jnp.exp(xe - broadcast(maxima))
  sums = per_group(e, 0.0, jnp.sum)
  x_landmark = per_group(jnp.where(landmark, x, -jnp.inf), -jnp.inf, jnp.max)
  shifts = []
  for m, s, xl in zip(maxima, sums, x_landmark):
    seen = s > 0
    shifts.append(jnp.where(seen, xl - m - jnp.log(jnp.where(seen, s, 1.0)), -jnp.inf))
  z = jnp.where(current, x, jnp.where(earlier_regular, x + broadcast(shifts), -jnp.inf))
  return TileTerms(z, e, current, landmark, masks, sums)


def forward_tile(spec: LandmarkSpec, q, k, v, m_prev, l_prev, acc_prev, *, q_start, kv_tile,
                 segment_visible=None):
  """One online-softmax step on the shifted logits of a key tile.

  Args:
    q: [bq, H]; k, v: [bk, H].
    m_prev, l_prev: [bq, 1] f32 running max (from MASK_VALUE) and sum (from 0).
    acc_prev: [bq, H] f32 running unnormalised output.

  Returns:
    (m, l, acc), the updated state; `flash_tiles.forward_finish` turns it into (out, lse).
  """
  z = tile_terms(spec, dot_nt(q, k) * spec.scale, q_start=q_start, kv_tile=kv_tile,
                 segment_visible=segment_visible).z
  m_next = jnp.maximum(m_prev, z.max(axis=1, keepdims=True))
  p = jnp.exp(z - m_next)
  alpha = jnp.exp(m_prev - m_next)
  l_next = alpha * l_prev + p.sum(axis=1, keepdims=True)
  acc = alpha * acc_prev + dot_nn(p.astype(v.dtype), v)
  return m_next, l_next, acc


def _grad_logits(terms: TileTerms, x, dp, lse, delta, kaxis):
  """(P, d(logits)) of a tile from the saved main lse M and delta D = rowsum(dO * O).

  With P = exp(z - M) and dP = dO . v: a current key gets P (dP - D); a regular key of earlier
  block g gets P (dP - E_g), where E_g = sum_g softmax_g(x) dP is dO . (the block's within-block
  output); the landmark of block g gets pi_g (E_g - D), pi_g = exp(x_L - M) its main probability.
  """
  p = jnp.exp(terms.z - lse)
  masks, sums = terms.group_masks, terms.group_sums
  expectations = []
  for m, s in zip(masks, sums):
    ed = terms.e * dp if m is None else jnp.where(m, terms.e * dp, 0.0)
    expectations.append(_reduce(ed, kaxis, jnp.sum) / jnp.where(s > 0, s, 1.0))
  if len(masks) == 1:
    e_cols = jnp.broadcast_to(expectations[0], x.shape)
  else:
    e_cols = jnp.broadcast_to(expectations[-1], x.shape)
    for m, value in zip(masks[:-1], expectations[:-1]):
      e_cols = jnp.where(m, value, e_cols)
  baseline = jnp.where(terms.current, delta, e_cols)  # P = 0 off the two kinds of keys
  pi = jnp.exp(jnp.where(terms.landmark, x, -jnp.inf) - lse)
  return p, p * (dp - baseline) + pi * (e_cols - delta)


def dq_tile(spec: LandmarkSpec, q, k, v, do, lse, delta, *, q_start, kv_tile,
            segment_visible=None):
  """A key tile's contribution to dq [bq, H] f32; lse, delta: [bq, 1] f32 (lse finite)."""
  x = dot_nt(q, k) * spec.scale
  terms = tile_terms(spec, x, q_start=q_start, kv_tile=kv_tile,
                     segment_visible=segment_visible)
  _, ds = _grad_logits(terms, x, dot_nt(do, v), lse, delta, 1)
  return dot_nn((ds * spec.scale).astype(k.dtype), k)


def dkv_tile(spec: LandmarkSpec, k, v, q, do, lse, delta, *, q_start, kv_tile,
             segment_visible=None):
  """A query tile's contribution to (dk, dv), each [bk, H] f32, on transposed tiles.

  Args:
    k, v: [bk, H]; q, do: [bq, H]; lse, delta: [1, bq] f32 (lse finite).
    segment_visible: as for `tile_terms`, [bk, bq].
  """
  x = dot_nt(k, q) * spec.scale
  terms = tile_terms(spec, x, q_start=q_start, kv_tile=kv_tile, transposed=True,
                     segment_visible=segment_visible)
  p, ds = _grad_logits(terms, x, dot_nt(v, do), lse, delta, 0)
  dv = dot_nn(p.astype(do.dtype), do)
  dk = dot_nn((ds * spec.scale).astype(q.dtype), q)
  return dk, dv
