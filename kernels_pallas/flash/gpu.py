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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import block_mask
from kernels_pallas import common
from kernels_pallas.flash import tiles as flash_tiles


class _Optional(NamedTuple):
  """The optional operand refs of a kernel (None where the spec has no use for them)."""
  params: Any  # [N * P] f32 bias parameters
  q_ids: Any
  kv_ids: Any
  q_pos: Any
  kv_pos: Any


def _unpack(spec, refs, n_out):
  """Splits the optional operands (bias parameters, segment ids, positions) from the outputs."""
  refs = list(refs)
  params = refs.pop(0) if spec.bias is not None else None
  q_ids, kv_ids = (refs.pop(0), refs.pop(0)) if spec.has_segments else (None, None)
  q_pos, kv_pos = (refs.pop(0), refs.pop(0)) if spec.has_positions else (None, None)
  return _Optional(params, q_ids, kv_ids, q_pos, kv_pos), refs[:n_out]


def _extra(spec, params, q_side, kv_side, q_spec, kv_spec):
  """Specs and arrays for the optional operands, in kernel order.

  Args:
    spec: the static spec.
    params: [N * P] f32 bias parameters or None.
    q_side: (segment ids, positions) of the queries, [B, Tp] int32 each or None.
    kv_side: the same for the keys, [B, Sp].
    q_spec: block spec of the query-side arrays.
    kv_spec: block spec of the key-side arrays.
  """
  specs, args = [], []
  if spec.bias is not None:
    specs.append(pl.BlockSpec(params.shape, lambda *_: (0,)))  # read as scalars
    args.append(params)
  for used, which in ((spec.has_segments, 0), (spec.has_positions, 1)):
    if used:
      specs += [q_spec, kv_spec]
      args += [q_side[which], kv_side[which]]
  return specs, args


def _where(spec, bias_params, q_ids, kv_ids, q_pos, kv_pos):
  """`flash_tiles.masked_logits` keywords from loaded per-token arrays, already shaped so that
  q - kv broadcasts to the tile (None where unused)."""
  return dict(bias_params=bias_params,
              segment_visible=None if q_ids is None else q_ids == kv_ids,
              positions=None if q_pos is None else (q_pos, kv_pos))


def _kv_loop(spec, q_block, q_offset, body, carry):
  """Runs body(kv_block, carry) over the KV blocks visible from a query block."""
  for lo, hi in block_mask.kv_block_ranges(spec, q_block, q_offset):
    if isinstance(hi, int) and hi == 0:  # no global tokens: the empty leading range
      continue
    carry = lax.fori_loop(lo, hi, body, carry)
  return carry


def _head_params(spec, ops, head):
  return None if spec.bias is None else flash_tiles.head_bias_params(spec, ops.params, head)


def _column(ref):
  """A loaded query block's per-row array as a column [bq, 1], or None."""
  return None if ref is None else ref[...][:, None]


def _row(ref, index):
  """A slice of a per-token array as a row [1, b], or None."""
  return None if ref is None else ref[index][None, :]


def _fwd_kernel(q_offset_ref, q_ref, k_ref, v_ref, *refs, spec):
  ops, (o_ref, lse_ref) = _unpack(spec, refs, 2)
  i, n = pl.program_id(0), pl.program_id(2)
  q_offset = q_offset_ref[0]
  bq, bk = spec.block_q, spec.block_k
  q = q_ref[...]
  bias_params = _head_params(spec, ops, n)
  q_ids, q_pos = _column(ops.q_ids), _column(ops.q_pos)

  def body(j, carry):
    kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
    return flash_tiles.forward_tile(
        spec, q, k_ref[kv, :], v_ref[kv, :], *carry, q_start=i * bq, kv_start=j * bk,
        q_offset=q_offset, **_where(spec, bias_params, q_ids, _row(ops.kv_ids, kv), q_pos,
                                    _row(ops.kv_pos, kv)))

  init = (jnp.full((bq, 1), flash_tiles.MASK_VALUE, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32), jnp.zeros(q.shape, jnp.float32))
  out, lse = flash_tiles.forward_finish(*_kv_loop(spec, i, q_offset, body, init))
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse[:, 0]


def _whole_kv_spec(sp, h, groups):
  """K or V of query head n's KV head, whole sequence (the body loads tiles with `pl.ds`)."""
  return pl.BlockSpec((None, None, sp, h),
                      lambda i, bi, ni: (bi, block_mask.int_div(ni, groups), 0, 0))


def forward(spec, q, k, v, q_offset, params, q_ids, kv_ids, q_pos, kv_pos, *, interpret):
  """Forward pass. Returns out [B, N, Tp, H] in q.dtype and lse [B, N, Tp] f32.

  Args: as for `flash_attention_tpu.forward`.
  """
  b, n, tp, h = q.shape
  groups = n // k.shape[1]
  sp = k.shape[2]
  bq = spec.block_q
  q_spec = pl.BlockSpec((None, None, bq, h), lambda i, bi, ni: (bi, ni, i, 0))
  kv_spec = _whole_kv_spec(sp, h, groups)
  extra_specs, extra_args = _extra(
      spec, params, (q_ids, q_pos), (kv_ids, kv_pos),
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


def _pack_columns(shares, width):
  """Per-parameter row shares ([rows, 1] each) -> [rows, width] with share p in column p."""
  column = lax.broadcasted_iota(jnp.int32, (shares[0].shape[0], width), 1)
  packed = jnp.zeros(column.shape, jnp.float32)
  for p, share in enumerate(shares):
    packed = jnp.where(column == p, share, packed)
  return packed


def _dq_kernel(q_offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec):
  # With a bias a second output holds each row's share of d(parameter p) in column p.
  ops, outs = _unpack(spec, refs, 1 if spec.bias is None else 2)
  i, n = pl.program_id(0), pl.program_id(2)
  q_offset = q_offset_ref[0]
  bq, bk = spec.block_q, spec.block_k
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  bias_params = _head_params(spec, ops, n)
  q_ids, q_pos = _column(ops.q_ids), _column(ops.q_pos)

  def body(j, carry):
    kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
    dq, dparams = flash_tiles.dq_tile(
        spec, q, k_ref[kv, :], v_ref[kv, :], do, lse, delta, q_start=i * bq, kv_start=j * bk,
        q_offset=q_offset, **_where(spec, bias_params, q_ids, _row(ops.kv_ids, kv), q_pos,
                                    _row(ops.kv_pos, kv)))
    if dparams is None:
      return (carry[0] + dq,)
    return carry[0] + dq, carry[1] + _pack_columns(dparams, carry[1].shape[1])

  init = (jnp.zeros(q.shape, jnp.float32),)
  if spec.bias is not None:
    init += (jnp.zeros((bq, _params_width(spec)), jnp.float32),)
  carry = _kv_loop(spec, i, q_offset, body, init)
  for out, acc in zip(outs, carry):
    out[...] = acc.astype(out.dtype)


def _params_width(spec):
  """Columns of the per-row d(params) block: P rounded up to a power of two (Triton's shapes)."""
  return max(16, common.next_power_of_2(spec.num_bias_params))


def _dkv_kernel(q_offset_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, spec,
                groups):
  ops, (dk_ref, dv_ref) = _unpack(spec, refs, 2)
  j, kh = pl.program_id(0), pl.program_id(2)
  q_offset = q_offset_ref[0]
  bq, bk = spec.block_q, spec.block_k
  k, v = k_ref[...], v_ref[...]
  kv_ids, kv_pos = _column(ops.kv_ids), _column(ops.kv_pos)  # keys are the tile's rows
  lo, hi = block_mask.q_block_range(spec, j, q_offset)

  def head_body(g, carry):
    bias_params = _head_params(spec, ops, kh * groups + g)

    def body(i, carry):
      rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
      dk, dv = flash_tiles.dkv_tile(
          spec, k, v, q_ref[g, rows, :], do_ref[g, rows, :], lse_ref[g, rows][None, :],
          delta_ref[g, rows][None, :], q_start=i * bq, kv_start=j * bk, q_offset=q_offset,
          **_where(spec, bias_params, _row(ops.q_ids, rows), kv_ids, _row(ops.q_pos, rows),
                   kv_pos))
      return carry[0] + dk, carry[1] + dv

    return lax.fori_loop(lo, hi, body, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, groups, head_body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(spec, q, k, v, q_offset, params, q_ids, kv_ids, q_pos, kv_pos, do, lse, delta, *,
             interpret):
  """Gradients dq [B, N, Tp, H], dk, dv [B, K, Sp, H] and per-row d(params) [B, N, Tp, P].

  dk and dv are summed over each KV head's query heads; d(params) (each row's share of the
  gradient of its head's bias parameters) is None without a bias.

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
  compiler = common.compiler_params("gpu", dimension_semantics=("parallel",) * 3, head_dim=h)

  q_spec = pl.BlockSpec((None, None, bq, h), lambda i, bi, ni: (bi, ni, i, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda i, bi, ni: (bi, ni, i))
  kv_spec = _whole_kv_spec(sp, h, groups)
  extra_specs, extra_args = _extra(
      spec, params, (q_ids, q_pos), (kv_ids, kv_pos),
      pl.BlockSpec((None, bq), lambda i, bi, ni: (bi, i)),
      pl.BlockSpec((None, sp), lambda i, bi, ni: (bi, 0)))
  out_specs, out_shape = [q_spec], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  if spec.bias is not None:  # per-row d(params), parameter p in column p
    width = _params_width(spec)
    out_specs.append(pl.BlockSpec((None, None, bq, width), lambda i, bi, ni: (bi, ni, i, 0)))
    out_shape.append(jax.ShapeDtypeStruct((b, n, tp, width), jnp.float32))
  dq, *dparams = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec),
      grid=(tp // bq, b, n),
      in_specs=[offset_spec, q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec,
                *extra_specs],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=compiler,
      interpret=interpret,
      name="flash_attention_dq",
  )(q_offset, q, k, v, do, lse, delta, *extra_args)

  # dk, dv: one program per (KV block, KV head) loops over the group's query heads and the
  # query blocks that see its keys, so GQA gradients are summed without a [B, N, S, H] buffer.
  t_kv_spec = pl.BlockSpec((None, None, bk, h), lambda j, bi, ki: (bi, ki, j, 0))
  t_q_spec = pl.BlockSpec((None, groups, tp, h), lambda j, bi, ki: (bi, ki, 0, 0))
  t_row_spec = pl.BlockSpec((None, groups, tp), lambda j, bi, ki: (bi, ki, 0))
  extra_specs, extra_args = _extra(
      spec, params, (q_ids, q_pos), (kv_ids, kv_pos),
      pl.BlockSpec((None, tp), lambda j, bi, ki: (bi, 0)),
      pl.BlockSpec((None, bk), lambda j, bi, ki: (bi, j)))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, groups=groups),
      grid=(sp // bk, b, nk),
      in_specs=[offset_spec, t_kv_spec, t_kv_spec, t_q_spec, t_q_spec, t_row_spec, t_row_spec,
                *extra_specs],
      out_specs=[t_kv_spec, t_kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=compiler,
      interpret=interpret,
      name="flash_attention_dkv",
  )(q_offset, k, v, q, do, lse, delta, *extra_args)
  return dq, dk, dv, dparams[0][..., :spec.num_bias_params] if dparams else None
