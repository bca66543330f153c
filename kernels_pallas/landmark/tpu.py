"""Landmark attention kernels written for Mosaic TPU (also run by the interpreter).

Layout as in flash attention: q, dO, O [B, N, Tp, H]; k, v [B, K, Sp, H] (head-major, in the
block-padded layout of `landmark_tiles`); query head n reads KV head n // G through the index
maps. The last grid axis is the reduction: key tiles for the forward and dq (steps past the last
causal tile re-map to it, so the pipeline copies nothing, and `pl.when` skips the compute), query
heads x query tiles for dk/dv. Row statistics are kept replicated over the 128 lanes, as in
`flash_attention_tpu`, and segment ids broadcast to [B, L, 128] (column use) or [B, 8, L] (row
use), as there.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import common
from kernels_pallas.flash import tiles as flash_tiles
from kernels_pallas.landmark import tiles as landmark_tiles

_LANES = common.TPU_LANES
_SUBLANES = common.TPU_SUBLANES


def _params(h):
  return common.compiler_params(
      "tpu", dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"), head_dim=h)


def _visible(spec, ids, transposed=False):
  """Segment visibility of a tile from its ids refs (query-side [bq, 128] columns and key-side
  [8, bk] rows; the other way round when `transposed`), or None without segments."""
  if not spec.has_segments:
    return None
  q_ids, kv_ids = ids
  if transposed:
    return kv_ids[:, 0:1] == q_ids[0:1, :]
  return q_ids[:, 0:1] == kv_ids[0:1, :]


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, spec, num_kv_tiles):
  ids, (o_ref, lse_ref, m_scr, l_scr, acc_scr) = _split_ids(spec, refs)
  i, s = pl.program_id(2), pl.program_id(3)

  @pl.when(s == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, flash_tiles.MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(s <= landmark_tiles.last_kv_tile(spec, i, num_kv_tiles))
  def _step():
    m, l, acc = landmark_tiles.forward_tile(
        spec, q_ref[...], k_ref[...], v_ref[...], m_scr[:, 0:1], l_scr[:, 0:1], acc_scr[...],
        q_start=i * spec.block_q, kv_tile=s, segment_visible=_visible(spec, ids))
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
    acc_scr[...] = acc

  @pl.when(s == num_kv_tiles - 1)
  def _finish():
    out, lse = flash_tiles.forward_finish(m_scr[:, 0:1], l_scr[:, 0:1], acc_scr[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def _split_ids(spec, refs):
  """(the segment ids refs (q, kv) or None, the other refs)."""
  if spec.has_segments:
    return refs[:2], refs[2:]
  return None, refs


def _ids_specs(spec, q_ids, kv_ids, kv_map):
  """Block specs and arrays of the forward/dq grid's segment ids: [B, Tp, 128] query columns,
  [B, 8, Sp] key rows."""
  if not spec.has_segments:
    return [], []
  bq, bk = spec.block_q, spec.block_k
  return ([pl.BlockSpec((None, bq, _LANES), lambda bi, ni, qi, si: (bi, qi, 0)),
           pl.BlockSpec((None, _SUBLANES, bk),
                        lambda bi, ni, qi, si: (bi, 0, kv_map(bi, ni, qi, si)[2]))],
          [common.tpu_columns(q_ids), common.tpu_rows(kv_ids)])


def _kv_maps(spec, groups, num_kv_tiles):
  """Index maps of the forward/dq grid (b, n, q tile, key step): q-like, row-like, kv-like."""

  def q_map(bi, ni, qi, si):
    del si
    return bi, ni, qi, 0

  def row_map(bi, ni, qi, si):
    del si
    return bi, ni, 0, qi

  def kv_map(bi, ni, qi, si):
    last = landmark_tiles.last_kv_tile(spec, qi, num_kv_tiles)
    return bi, lax.div(ni, groups), jnp.minimum(si, last), 0

  return q_map, row_map, kv_map


def forward(spec, q, k, v, q_ids=None, kv_ids=None, *, interpret):
  """Forward pass. Returns out [B, N, Tp, H] in q.dtype and lse [B, N, Tp] f32.

  q_ids, kv_ids: [B, Tp] and [B, Sp] int32 segment ids (with `spec.has_segments`)."""
  b, n, tp, h = q.shape
  num_kv_tiles = k.shape[2] // spec.block_k
  bq, bk = spec.block_q, spec.block_k
  q_map, _, kv_map = _kv_maps(spec, n // k.shape[1], num_kv_tiles)
  id_specs, id_args = _ids_specs(spec, q_ids, kv_ids, kv_map)
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec, num_kv_tiles=num_kv_tiles),
      grid=(b, n, tp // bq, num_kv_tiles),
      in_specs=[pl.BlockSpec((None, None, bq, h), q_map),
                pl.BlockSpec((None, None, bk, h), kv_map),
                pl.BlockSpec((None, None, bk, h), kv_map), *id_specs],
      out_specs=[pl.BlockSpec((None, None, bq, h), q_map),
                 pl.BlockSpec((None, None, bq, _LANES), q_map)],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, tp, _LANES), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32),
                      pltpu.VMEM((bq, _LANES), jnp.float32),
                      pltpu.VMEM((bq, h), jnp.float32)],
      compiler_params=_params(h),
      interpret=interpret,
      name="landmark_attention_fwd",
  )(q, k, v, *id_args)
  return out, lse[..., 0]


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec, num_kv_tiles):
  ids, (dq_ref, dq_scr) = _split_ids(spec, refs)
  i, s = pl.program_id(2), pl.program_id(3)

  @pl.when(s == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when(s <= landmark_tiles.last_kv_tile(spec, i, num_kv_tiles))
  def _step():
    dq_scr[...] += landmark_tiles.dq_tile(
        spec, q_ref[...], k_ref[...], v_ref[...], do_ref[...],
        jnp.expand_dims(lse_ref[0], -1), jnp.expand_dims(delta_ref[0], -1),
        q_start=i * spec.block_q, kv_tile=s, segment_visible=_visible(spec, ids))

  @pl.when(s == num_kv_tiles - 1)
  def _finish():
    dq_ref[...] = dq_scr[...].astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, spec, num_q_tiles):
  ids, (dk_ref, dv_ref, dk_scr, dv_scr) = _split_ids(spec, refs)
  j, s = pl.program_id(2), pl.program_id(3)
  i = landmark_tiles.first_q_tile(spec, j) + lax.rem(s, num_q_tiles)

  @pl.when(s == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(i < num_q_tiles)
  def _step():
    dk, dv = landmark_tiles.dkv_tile(
        spec, k_ref[...], v_ref[...], q_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
        q_start=i * spec.block_q, kv_tile=j,
        segment_visible=_visible(spec, ids, transposed=True))
    dk_scr[...] += dk
    dv_scr[...] += dv

  @pl.when(s == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(spec, q, k, v, do, lse, delta, q_ids=None, kv_ids=None, *, interpret):
  """Gradients dq [B, N, Tp, H], dk, dv [B, K, Sp, H] (summed over each KV head's query heads).

  Args:
    lse: [B, N, Tp] f32 main log-sum-exp, -inf replaced by a finite value.
    delta: [B, N, Tp] f32 rowsum(dO * O).
    (others as for `forward`; do like q.)
  """
  b, n, tp, h = q.shape
  nk, sp = k.shape[1], k.shape[2]
  groups = n // nk
  bq, bk = spec.block_q, spec.block_k
  num_q_tiles, num_kv_tiles = tp // bq, sp // bk
  # Row statistics as [B, N, 1, Tp]: a block (1, bq) puts positions on lanes.
  lse, delta = lse[:, :, None, :], delta[:, :, None, :]

  q_map, row_map, kv_map = _kv_maps(spec, groups, num_kv_tiles)
  q_spec = pl.BlockSpec((None, None, bq, h), q_map)
  row_spec = pl.BlockSpec((None, None, 1, bq), row_map)
  kv_spec = pl.BlockSpec((None, None, bk, h), kv_map)
  id_specs, id_args = _ids_specs(spec, q_ids, kv_ids, kv_map)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, num_kv_tiles=num_kv_tiles),
      grid=(b, n, num_q_tiles, num_kv_tiles),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *id_specs],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
      compiler_params=_params(h),
      interpret=interpret,
      name="landmark_attention_dq",
  )(q, k, v, do, lse, delta, *id_args)

  # dk, dv: one program per key tile and KV head; the reduction axis walks (query head of the
  # group, query tile from the first causal one), so GQA gradients sum in the accumulator.
  # Steps past the last query tile re-map to it (no copy) and are skipped.
  def q_tile(kj, si):
    first = landmark_tiles.first_q_tile(spec, kj)
    return jnp.minimum(first + lax.rem(si, num_q_tiles), num_q_tiles - 1)

  def t_q_map(bi, ki, kj, si):
    return bi, ki * groups + lax.div(si, num_q_tiles), q_tile(kj, si), 0

  def t_row_map(bi, ki, kj, si):
    return bi, ki * groups + lax.div(si, num_q_tiles), 0, q_tile(kj, si)

  def t_kv_map(bi, ki, kj, si):
    del si
    return bi, ki, kj, 0

  t_q_spec = pl.BlockSpec((None, None, bq, h), t_q_map)
  t_row_spec = pl.BlockSpec((None, None, 1, bq), t_row_map)
  t_kv_spec = pl.BlockSpec((None, None, bk, h), t_kv_map)
  t_id_specs, t_id_args = [], []
  if spec.has_segments:  # transposed tiles: query ids as [8, bq] rows, key ids as columns
    t_id_specs = [pl.BlockSpec((None, _SUBLANES, bq),
                               lambda bi, ki, kj, si: (bi, 0, q_tile(kj, si))),
                  pl.BlockSpec((None, bk, _LANES), lambda bi, ki, kj, si: (bi, kj, 0))]
    t_id_args = [common.tpu_rows(q_ids), common.tpu_columns(kv_ids)]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, num_q_tiles=num_q_tiles),
      grid=(b, nk, num_kv_tiles, groups * num_q_tiles),
      in_specs=[t_kv_spec, t_kv_spec, t_q_spec, t_q_spec, t_row_spec, t_row_spec, *t_id_specs],
      out_specs=[t_kv_spec, t_kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
      compiler_params=_params(h),
      interpret=interpret,
      name="landmark_attention_dkv",
  )(k, v, q, do, lse, delta, *t_id_args)
  return dq, dk, dv
