"""Landmark attention kernels written for Triton on GPU (also run by the interpreter).

Layout as in flash attention: q, dO, O [B, N, Tp, H]; k, v [B, K, Sp, H] (head-major, in the
block-padded layout of `landmark_tiles`); query head n reads KV head n // G through the index
maps. Triton has no sequential grid axes, so each program owns one output tile and loops over
the tiles it reduces over: key tiles 0..last causal one (forward, dq), or the query tiles that
see a key tile, for each query head of the group (dk, dv). K/V (and, for dK/dV, the group's
Q/dO) are whole-sequence blocks that stay in global memory; the body loads one tile at a time.
Segment ids ([B, Tp], [B, Sp]) follow the same blocks: the program's own tile, the reduced-over
side whole.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import common
from kernels_pallas.flash import tiles as flash_tiles
from kernels_pallas.landmark import tiles as landmark_tiles


def _split_ids(spec, refs):
  """(the segment ids refs (own tile's, whole other side's) or None, the other refs)."""
  if spec.has_segments:
    return refs[:2], refs[2:]
  return None, refs


def _visible(ids, tile):
  """Segment visibility [own, tile] of the program's own ids against the other side's rows
  `tile` (a `pl.ds`), or None without segments."""
  if ids is None:
    return None
  return ids[0][...][:, None] == ids[1][tile][None, :]


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, spec, num_kv_tiles):
  ids, (o_ref, lse_ref) = _split_ids(spec, refs)
  i = pl.program_id(0)
  bq, bk = spec.block_q, spec.block_k
  q = q_ref[...]

  def body(j, carry):
    kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
    return landmark_tiles.forward_tile(spec, q, k_ref[kv, :], v_ref[kv, :], *carry,
                                       q_start=i * bq, kv_tile=j,
                                       segment_visible=_visible(ids, kv))

  init = (jnp.full((bq, 1), flash_tiles.MASK_VALUE, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32), jnp.zeros(q.shape, jnp.float32))
  last = landmark_tiles.last_kv_tile(spec, i, num_kv_tiles)
  out, lse = flash_tiles.forward_finish(*lax.fori_loop(0, last + 1, body, init))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _whole_kv_spec(sp, h, groups):
  """K or V of query head n's KV head, whole sequence (the body loads tiles with `pl.ds`)."""
  return pl.BlockSpec((None, None, sp, h), lambda i, bi, ni: (bi, lax.div(ni, groups), 0, 0))


def _params(h):
  return common.compiler_params("gpu", dimension_semantics=("parallel",) * 3, head_dim=h)


def _ids_specs(spec, q_ids, kv_ids, tile: int, whole: int, own_first: bool):
  """Block specs and arrays of the segment ids: the program's own tile of `tile` positions (the
  query ids, or the key ids in the dK/dV grid), the other side's ids whole."""
  if not spec.has_segments:
    return [], []
  own, other = (q_ids, kv_ids) if own_first else (kv_ids, q_ids)
  return ([pl.BlockSpec((None, tile), lambda i, bi, ni: (bi, i)),
           pl.BlockSpec((None, whole), lambda i, bi, ni: (bi, 0))], [own, other])


def forward(spec, q, k, v, q_ids=None, kv_ids=None, *, interpret):
  """Forward pass. Returns out [B, N, Tp, H] in q.dtype and lse [B, N, Tp] f32.

  q_ids, kv_ids: [B, Tp] and [B, Sp] int32 segment ids (with `spec.has_segments`)."""
  b, n, tp, h = q.shape
  sp = k.shape[2]
  bq = spec.block_q
  q_spec = pl.BlockSpec((None, None, bq, h), lambda i, bi, ni: (bi, ni, i, 0))
  kv_spec = _whole_kv_spec(sp, h, n // k.shape[1])
  id_specs, id_args = _ids_specs(spec, q_ids, kv_ids, bq, sp, own_first=True)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec, num_kv_tiles=sp // spec.block_k),
      grid=(tp // bq, b, n),
      in_specs=[q_spec, kv_spec, kv_spec, *id_specs],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
      compiler_params=_params(h),
      interpret=interpret,
      name="landmark_attention_fwd",
  )(q, k, v, *id_args)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec, num_kv_tiles):
  ids, (dq_ref,) = _split_ids(spec, refs)
  i = pl.program_id(0)
  bq, bk = spec.block_q, spec.block_k
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

  def body(j, dq):
    kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
    return dq + landmark_tiles.dq_tile(spec, q, k_ref[kv, :], v_ref[kv, :], do, lse, delta,
                                       q_start=i * bq, kv_tile=j,
                                       segment_visible=_visible(ids, kv))

  last = landmark_tiles.last_kv_tile(spec, i, num_kv_tiles)
  dq = lax.fori_loop(0, last + 1, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, spec, groups,
                num_q_tiles):
  ids, (dk_ref, dv_ref) = _split_ids(spec, refs)
  j = pl.program_id(0)
  bq = spec.block_q
  k, v = k_ref[...], v_ref[...]
  first = landmark_tiles.first_q_tile(spec, j)

  def head_body(g, carry):
    def body(i, carry):
      rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
      dk, dv = landmark_tiles.dkv_tile(
          spec, k, v, q_ref[g, rows, :], do_ref[g, rows, :], lse_ref[g, rows][None, :],
          delta_ref[g, rows][None, :], q_start=i * bq, kv_tile=j,
          segment_visible=_visible(ids, rows))
      return carry[0] + dk, carry[1] + dv

    return lax.fori_loop(first, num_q_tiles, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, groups, head_body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


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
  q_spec = pl.BlockSpec((None, None, bq, h), lambda i, bi, ni: (bi, ni, i, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))
  kv_spec = _whole_kv_spec(sp, h, groups)
  id_specs, id_args = _ids_specs(spec, q_ids, kv_ids, bq, sp, own_first=True)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, num_kv_tiles=sp // bk),
      grid=(tp // bq, b, n),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *id_specs],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(h),
      interpret=interpret,
      name="landmark_attention_dq",
  )(q, k, v, do, lse, delta, *id_args)

  # dk, dv: one program per (key tile, KV head) loops over the group's query heads and the
  # query tiles that see its keys, so GQA gradients are summed without a [B, N, S, H] buffer.
  t_kv_spec = pl.BlockSpec((None, None, bk, h), lambda j, bi, ki: (bi, ki, j, 0))
  t_q_spec = pl.BlockSpec((None, groups, tp, h), lambda j, bi, ki: (bi, ki, 0, 0))
  t_row_spec = pl.BlockSpec((None, groups, tp), lambda j, bi, ki: (bi, ki, 0))
  t_id_specs, t_id_args = _ids_specs(spec, q_ids, kv_ids, bk, tp, own_first=False)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, groups=groups, num_q_tiles=tp // bq),
      grid=(sp // bk, b, nk),
      in_specs=[t_kv_spec, t_kv_spec, t_q_spec, t_q_spec, t_row_spec, t_row_spec, *t_id_specs],
      out_specs=[t_kv_spec, t_kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=_params(h),
      interpret=interpret,
      name="landmark_attention_dkv",
  )(k, v, q, do, lse, delta, *t_id_args)
  return dq, dk, dv
