"""Flash attention kernels written for Triton on GPU (also run by the interpreter).

Layout as in the TPU variant: q, dO, O [B, N, Tp, H]; k, v [B, K, Sp, H]; query head n reads KV
head n // G through the index maps. Triton has no sequential grid axes, so each program owns one
output block and loops over the blocks it reduces over inside its body. The loop bounds come
from `block_mask` (the visible KV blocks of a query block, or the query blocks that see a KV
block), so skipped blocks are neither loaded nor computed. With global tokens the forward and dq
loops run twice: over the leading blocks, then over the local window.

K/V (and, for dK/dV, the group's Q/dO) are passed as whole-sequence blocks that stay in global
memory; the body loads one tile at a time with `pl.ds`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import block_mask
from kernels_pallas import common
from kernels_pallas import flash_tiles


def _unpack(spec, refs, n_out):
  """Splits the optional operands (slopes, segment ids) from the outputs."""
  refs = list(refs)
  slopes = refs.pop(0) if spec.has_alibi else None
  q_ids, kv_ids = (refs.pop(0), refs.pop(0)) if spec.has_segments else (None, None)
  return slopes, q_ids, kv_ids, refs[:n_out]


def _extra(spec, slopes, q_ids, kv_ids, q_ids_spec, kv_ids_spec):
  """Specs and arrays for the optional operands, in kernel order."""
  specs, args = [], []
  if spec.has_alibi:
    specs.append(pl.BlockSpec(slopes.shape, lambda *_: (0,)))  # [N], read as scalars
    args.append(slopes)
  if spec.has_segments:
    specs += [q_ids_spec, kv_ids_spec]
    args += [q_ids, kv_ids]
  return specs, args


def _kv_loop(spec, q_block, q_offset, body, carry):
  """Runs body(kv_block, carry) over the KV blocks visible from a query block."""
  for lo, hi in block_mask.kv_block_ranges(spec, q_block, q_offset):
    if isinstance(hi, int) and hi == 0:  # no global tokens: the empty leading range
      continue
    carry = lax.fori_loop(lo, hi, body, carry)
  return carry


def _fwd_kernel(q_offset_ref, q_ref, k_ref, v_ref, *refs, spec):
  slopes_ref, q_ids_ref, kv_ids_ref, (o_ref, lse_ref) = _unpack(spec, refs, 2)
  i, n = pl.program_id(0), pl.program_id(2)
  q_offset = q_offset_ref[0]
  bq, bk = spec.block_q, spec.block_k
  q = q_ref[...]
  slope = slopes_ref[n] if spec.has_alibi else None
  q_ids = q_ids_ref[...][:, None] if spec.has_segments else None

  def body(j, carry):
    kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
    segment_visible = None if q_ids is None else q_ids == kv_ids_ref[kv][None, :]
    return flash_tiles.forward_tile(
        spec, q, k_ref[kv, :], v_ref[kv, :], *carry, q_start=i * bq, kv_start=j * bk,
        q_offset=q_offset, slope=slope, segment_visible=segment_visible)

  init = (jnp.full((bq, 1), flash_tiles.MASK_VALUE, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32), jnp.zeros(q.shape, jnp.float32))
  out, lse = flash_tiles.forward_finish(*_kv_loop(spec, i, q_offset, body, init))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _whole_kv_spec(sp, h, groups):
  """K or V of query head n's KV head, whole sequence (the body loads tiles with `pl.ds`)."""
  return pl.BlockSpec((None, None, sp, h),
                      lambda i, bi, ni: (bi, block_mask.int_div(ni, groups), 0, 0))


def forward(spec, q, k, v, q_offset, slopes, q_ids, kv_ids, *, interpret):
  """Forward pass. Returns out [B, N, Tp, H] in q.dtype and lse [B, N, Tp] f32."""
  b, n, tp, h = q.shape
  groups = n // k.shape[1]
  sp = k.shape[2]
  bq = spec.block_q
  q_spec = pl.BlockSpec((None, None, bq, h), lambda i, bi, ni: (bi, ni, i, 0))
  kv_spec = _whole_kv_spec(sp, h, groups)
  extra_specs, extra_args = _extra(
      spec, slopes, q_ids, kv_ids,
      pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, i)),
      pl.BlockSpec((None, sp), lambda i, bi, ni: (bi, 0)))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec),
      grid=(tp // bq, b, n),
      in_specs=[pl.BlockSpec((1,), lambda *_: (0,)), q_spec, kv_spec, kv_spec, *extra_specs],
      out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
      compiler_params=common.compiler_params(
          "gpu", dimension_semantics=("parallel",) * 3, head_dim=h),
      interpret=interpret,
      name="flash_attention_fwd",
  )(q_offset, q, k, v, *extra_args)


def _dq_kernel(q_offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec):
  # With ALiBi a second output holds each row's share of d(slope).
  slopes_ref, q_ids_ref, kv_ids_ref, outs = _unpack(spec, refs, 2 if spec.has_alibi else 1)
  i, n = pl.program_id(0), pl.program_id(2)
  q_offset = q_offset_ref[0]
  bq, bk = spec.block_q, spec.block_k
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  slope = slopes_ref[n] if spec.has_alibi else None
  q_ids = q_ids_ref[...][:, None] if spec.has_segments else None

  def body(j, carry):
    kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
    segment_visible = None if q_ids is None else q_ids == kv_ids_ref[kv][None, :]
    dq, dslope = flash_tiles.dq_tile(
        spec, q, k_ref[kv, :], v_ref[kv, :], do, lse, delta, q_start=i * bq, kv_start=j * bk,
        q_offset=q_offset, slope=slope, segment_visible=segment_visible)
    return (carry[0] + dq,) + ((carry[1] + dslope,) if spec.has_alibi else ())

  init = (jnp.zeros(q.shape, jnp.float32),)
  if spec.has_alibi:
    init += (jnp.zeros((bq, 1), jnp.float32),)
  carry = _kv_loop(spec, i, q_offset, body, init)
  outs[0][...] = carry[0].astype(outs[0].dtype)
  if spec.has_alibi:
    outs[1][...] = carry[1][:, 0]


def _dkv_kernel(q_offset_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, spec,
                groups):
  slopes_ref, q_ids_ref, kv_ids_ref, (dk_ref, dv_ref) = _unpack(spec, refs, 2)
  j, kh = pl.program_id(0), pl.program_id(2)
  q_offset = q_offset_ref[0]
  bq, bk = spec.block_q, spec.block_k
  k, v = k_ref[...], v_ref[...]
  kv_ids = kv_ids_ref[...][:, None] if spec.has_segments else None
  lo, hi = block_mask.q_block_range(spec, j, q_offset)

  def head_body(g, carry):
    slope = slopes_ref[kh * groups + g] if spec.has_alibi else None

    def body(i, carry):
      rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
      segment_visible = None if kv_ids is None else kv_ids == q_ids_ref[rows][None, :]
      dk, dv = flash_tiles.dkv_tile(
          spec, k, v, q_ref[g, rows, :], do_ref[g, rows, :], lse_ref[g, rows][None, :],
          delta_ref[g, rows][None, :], q_start=i * bq, kv_start=j * bk, q_offset=q_offset,
          slope=slope, segment_visible=segment_visible)
      return carry[0] + dk, carry[1] + dv

    return lax.fori_loop(lo, hi, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, groups, head_body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(spec, q, k, v, q_offset, slopes, q_ids, kv_ids, do, lse, delta, *, interpret):
  """Gradients dq [B, N, Tp, H], dk, dv [B, K, Sp, H] and per-row d(slope) [B, N, Tp] or None.

  dk and dv are summed over each KV head's query heads; d(slope) is only computed with ALiBi.

  Args:
    lse: [B, N, Tp] f32 with -inf replaced by a finite value.
    delta: [B, N, Tp] f32 rowsum(dO * O).
    (others as for `forward`; do like q.)
  """
  b, n, tp, h = q.shape
  nk, sp = k.shape[1], k.shape[2]
  groups = n // nk
  bq, bk = spec.block_q, spec.block_k
  offset_spec = pl.BlockSpec((1,), lambda *_: (0,))
  params = common.compiler_params("gpu", dimension_semantics=("parallel",) * 3, head_dim=h)

  q_spec = pl.BlockSpec((None, None, bq, h), lambda i, bi, ni: (bi, ni, i, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))
  kv_spec = _whole_kv_spec(sp, h, groups)
  extra_specs, extra_args = _extra(
      spec, slopes, q_ids, kv_ids,
      pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, i)),
      pl.BlockSpec((None, sp), lambda i, bi, ni: (bi, 0)))
  out_specs, out_shape = [q_spec], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if spec.has_alibi:  # per-row d(slope)
    out_specs.append(row_spec)
    out_shape.append(jax.ShapeDtypeStruct((b, n, tp), jnp.float32))
  dq, *dslope = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec),
      grid=(tp // bq, b, n),
      in_specs=[offset_spec, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *extra_specs],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=params,
      interpret=interpret,
      name="flash_attention_dq",
  )(q_offset, q, k, v, do, lse, delta, *extra_args)

  # dk, dv: one program per (KV block, KV head) loops over the group's query heads and the
  # query blocks that see its keys, so GQA gradients are summed without a [B, N, S, H] buffer.
  t_kv_spec = pl.BlockSpec((None, None, bk, h), lambda j, bi, ki: (bi, ki, j, 0))
  t_q_spec = pl.BlockSpec((None, groups, tp, h), lambda j, bi, ki: (bi, ki, 0, 0))
  t_row_spec = pl.BlockSpec((None, groups, tp), lambda j, bi, ki: (bi, ki, 0))
  extra_specs, extra_args = _extra(
      spec, slopes, q_ids, kv_ids,
      pl.BlockSpec((None, tp), lambda j, bi, ki: (bi, 0)),
      pl.BlockSpec((None, bk), lambda j, bi, ki: (bi, j)))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, groups=groups),
      grid=(sp // bk, b, nk),
      in_specs=[offset_spec, t_kv_spec, t_kv_spec, t_q_spec, t_q_spec, t_row_spec, t_row_spec,
                *extra_specs],
      out_specs=[t_kv_spec, t_kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name="flash_attention_dkv",
  )(q_offset, k, v, q, do, lse, delta, *extra_args)
  return dq, dk, dv, dslope[0] if dslope else None
