"""Flash attention kernels written for Mosaic TPU (also run by the interpreter).

Layout: q, dO, O [B, N, Tp, H]; k, v [B, K, Sp, H] (head-major, lengths padded to the blocks);
query head n reads KV head n // G through the index maps, so K/V are never repeated.

Skipping: the last grid axis walks the *visited* blocks, not all blocks: step s of query block i
is KV block `kv_step_to_block(i, s)`, and its extent is a static bound on the visited count
(`kv_steps_bound`, e.g. ~(block_q + window) / block_k for a sliding window). Steps past the
visible blocks of a query block re-map to its last visible block: the pipeline sees the same
block index as on the step before and copies nothing, and `pl.when` skips the compute. The
query offset is a scalar-prefetch operand, so the index maps can read it before any copy.

Vreg tiling: row statistics (running max and sum, lse) are kept replicated over the 128 lanes,
[rows, 128] (each row's d(bias parameter) shares sit in lanes 0..P-1 of one such array, or of
[rows, 128 k] for P > 128: T5 tables, FIRE MLPs), and
segment ids and positions are broadcast to [B, L, 128] (column use) or [B, 8, L] (row use), as
jax's own TPU kernels do. The forward's lse output is therefore transiently 128x
its size ([B, N, Tp, 128] f32, 256 MiB at N=8, T=64k) before it is sliced.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import block_mask
from kernels_pallas import common
from kernels_pallas.flash import tiles as flash_tiles

_LANES = common.TPU_LANES  # row statistics are kept replicated over the vreg lanes
_SUBLANES = common.TPU_SUBLANES


class _Optional(NamedTuple):
  """The optional operand refs of a kernel (None where the spec has no use for them)."""
  params: Any  # [N * P] f32 bias parameters in SMEM
  q_ids: Any
  kv_ids: Any
  q_pos: Any
  kv_pos: Any


def _unpack(spec, refs, n_out):
  """Splits the optional operands (bias parameters, segment ids, positions) from the outputs
  and scratch."""
  refs = list(refs)
  params = refs.pop(0) if spec.bias is not None else None
  q_ids, kv_ids = (refs.pop(0), refs.pop(0)) if spec.has_segments else (None, None)
  q_pos, kv_pos = (refs.pop(0), refs.pop(0)) if spec.has_positions else (None, None)
  return _Optional(params, q_ids, kv_ids, q_pos, kv_pos), refs[:n_out], refs[n_out:]


def _extra_inputs(spec, params, q_side, kv_side, q_spec, kv_spec):
  """Specs and arrays for the optional operands, in kernel order.

  Args:
    spec: the static spec.
    params: [N * P] f32 bias parameters or None.
    q_side: (segment ids, positions) of the queries, each in the layout `q_spec` blocks.
    kv_side: the same for the keys, in the layout of `kv_spec`.
    q_spec: block spec of the query-side arrays.
    kv_spec: block spec of the key-side arrays.
  """
  specs, args = [], []
  if spec.bias is not None:
    specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))  # read as scalars
    args.append(params)
  for used, which in ((spec.has_segments, 0), (spec.has_positions, 1)):
    if used:
      specs += [q_spec, kv_spec]
      args += [q_side[which], kv_side[which]]
  return specs, args


def _where(spec, ops, head, *, transposed=False):
  """The tile's bias parameters, segment visibility and positions (`flash_tiles.masked_logits`).

  Query-side refs hold [bq, 128] (columns) and key-side refs [8, bk] (rows), or the other way
  round when `transposed` (dK/dV tiles are keys x queries).
  """
  col = lambda ref: ref[:, 0:1]
  row = lambda ref: ref[0:1, :]
  q_get, kv_get = (row, col) if transposed else (col, row)
  where = dict(bias_params=None, segment_visible=None, positions=None)
  if spec.bias is not None:
    where["bias_params"] = flash_tiles.head_bias_params(spec, ops.params, head)
  if spec.has_segments:
    where["segment_visible"] = q_get(ops.q_ids) == kv_get(ops.kv_ids)
  if spec.has_positions:
    where["positions"] = (q_get(ops.q_pos), kv_get(ops.kv_pos))
  return where


def _pack_lanes(shares, shape):
  """Per-parameter row shares ([rows, 1] each) -> [rows, width] with share p in lane p."""
  lane = lax.broadcasted_iota(jnp.int32, shape, 1)
  packed = jnp.zeros(shape, jnp.float32)
  for p, share in enumerate(shares):
    packed = jnp.where(lane == p, share, packed)
  return packed


def _lanes(*arrays):
  """`common.tpu_columns` of each optional [B, L] array (None stays None)."""
  return tuple(None if x is None else common.tpu_columns(x) for x in arrays)


def _sublanes(*arrays):
  """`common.tpu_rows` of each optional [B, L] array (None stays None)."""
  return tuple(None if x is None else common.tpu_rows(x) for x in arrays)


def _fwd_kernel(q_offset_ref, q_ref, k_ref, v_ref, *refs, spec):
  ops, (o_ref, lse_ref), (m_scr, l_scr, acc_scr) = _unpack(spec, refs, 2)
  n, i, s = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  q_offset = q_offset_ref[0]
  block, valid = block_mask.kv_step_to_block(spec, i, s, q_offset)

  @pl.when(s == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, flash_tiles.MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(valid)
  def _step():
    m, l, acc = flash_tiles.forward_tile(
        spec, q_ref[...], k_ref[...], v_ref[...], m_scr[:, 0:1], l_scr[:, 0:1], acc_scr[...],
        q_start=i * spec.block_q, kv_start=block * spec.block_k, q_offset=q_offset,
        **_where(spec, ops, n))
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
    acc_scr[...] = acc

  @pl.when(s == pl.num_programs(3) - 1)
  def _finish():
    out, lse = flash_tiles.forward_finish(m_scr[:, 0:1], l_scr[:, 0:1], acc_scr[...])
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def forward(spec, q, k, v, q_offset, params, q_ids, kv_ids, q_pos, kv_pos, *, interpret):
  """Forward pass. Returns out [B, N, Tp, H] in q.dtype and lse [B, N, Tp] f32.

  Args:
    spec: the static spec.
    q: [B, N, Tp, H]; k, v: [B, K, Sp, H] (padded to the blocks).
    q_offset: [1] int32.
    params: [N * P] f32 bias parameters (head-major) or None.
    q_ids, kv_ids: [B, Tp] and [B, Sp] int32 segment ids or None.
    q_pos, kv_pos: [B, Tp] and [B, Sp] int32 bias positions or None.
    interpret: run the Pallas interpreter.
  """
  b, n, tp, h = q.shape
  groups = n // k.shape[1]
  bq, bk = spec.block_q, spec.block_k

  def q_map(bi, ni, qi, si, q_offset_ref):
    del si, q_offset_ref
    return bi, ni, qi, 0

  def kv_block(qi, si, q_offset_ref):
    return block_mask.kv_step_to_block(spec, qi, si, q_offset_ref[0])[0]

  def kv_map(bi, ni, qi, si, q_offset_ref):
    return bi, block_mask.int_div(ni, groups), kv_block(qi, si, q_offset_ref), 0

  extra_specs, extra_args = _extra_inputs(
      spec, params, _lanes(q_ids, q_pos), _sublanes(kv_ids, kv_pos),
      pl.BlockSpec((None, bq, _LANES), lambda bi, ni, qi, si, r: (bi, qi, 0)),
      pl.BlockSpec((None, _SUBLANES, bk),
                   lambda bi, ni, qi, si, r: (bi, 0, kv_block(qi, si, r))))
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, n, tp // bq, block_mask.kv_steps_bound(spec)),
          in_specs=[pl.BlockSpec((None, None, bq, h), q_map),
                    pl.BlockSpec((None, None, bk, h), kv_map),
                    pl.BlockSpec((None, None, bk, h), kv_map), *extra_specs],
          out_specs=[pl.BlockSpec((None, None, bq, h), q_map),
                     pl.BlockSpec((None, None, bq, _LANES), q_map)],
          scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32),
                          pltpu.VMEM((bq, _LANES), jnp.float32),
                          pltpu.VMEM((bq, h), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, n, tp, _LANES), jnp.float32)],
      compiler_params=common.compiler_params(
          "tpu", dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
          head_dim=h),
      interpret=interpret,
      name="flash_attention_fwd",
  )(q_offset, q, k, v, *extra_args)
  return out, lse[..., 0]


def _dq_kernel(q_offset_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, spec):
  # With a bias a second output (and accumulator) holds each row's share of d(parameter p) in
  # lane p.
  ops, outs, scratch = _unpack(spec, refs, 1 if spec.bias is None else 2)
  n, i, s = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  q_offset = q_offset_ref[0]
  block, valid = block_mask.kv_step_to_block(spec, i, s, q_offset)

  @pl.when(s == 0)
  def _init():
    for scr in scratch:
      scr[...] = jnp.zeros(scr.shape, jnp.float32)

  @pl.when(valid)
  def _step():
    dq, dparams = flash_tiles.dq_tile(
        spec, q_ref[...], k_ref[...], v_ref[...], do_ref[...],
        jnp.expand_dims(lse_ref[0], -1), jnp.expand_dims(delta_ref[0], -1),
        q_start=i * spec.block_q, kv_start=block * spec.block_k, q_offset=q_offset,
        **_where(spec, ops, n))
    scratch[0][...] += dq
    if spec.bias is not None:
      scratch[1][...] += _pack_lanes(dparams, scratch[1].shape)

  @pl.when(s == pl.num_programs(3) - 1)
  def _finish():
    for out, scr in zip(outs, scratch):
      out[...] = scr[...].astype(out.dtype)


def _dkv_kernel(q_offset_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs, spec,
                groups, q_steps):
  ops, (dk_ref, dv_ref), (dk_scr, dv_scr) = _unpack(spec, refs, 2)
  kh, j, s = pl.program_id(1), pl.program_id(2), pl.program_id(3)
  q_offset = q_offset_ref[0]
  g, qs = lax.div(s, q_steps), lax.rem(s, q_steps)
  block, valid = block_mask.q_step_to_block(spec, j, qs, q_offset)

  @pl.when(s == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(valid)
  def _step():
    dk, dv = flash_tiles.dkv_tile(
        spec, k_ref[...], v_ref[...], q_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
        q_start=block * spec.block_q, kv_start=j * spec.block_k, q_offset=q_offset,
        **_where(spec, ops, kh * groups + g, transposed=True))
    dk_scr[...] += dk
    dv_scr[...] += dv

  @pl.when(s == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = dk_scr[...].astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


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
  # Row statistics as [B, N, 1, Tp]: a block (1, bq) puts positions on lanes.
  lse, delta = lse[:, :, None, :], delta[:, :, None, :]
  q_col, q_row = _lanes(q_ids, q_pos), _sublanes(q_ids, q_pos)
  kv_col, kv_row = _lanes(kv_ids, kv_pos), _sublanes(kv_ids, kv_pos)

  # dq: the forward's grid and block walk.
  def q_map(bi, ni, qi, si, q_offset_ref):
    del si, q_offset_ref
    return bi, ni, qi, 0

  def row_map(bi, ni, qi, si, q_offset_ref):
    del si, q_offset_ref
    return bi, ni, 0, qi

  def kv_block(qi, si, q_offset_ref):
    return block_mask.kv_step_to_block(spec, qi, si, q_offset_ref[0])[0]

  def kv_map(bi, ni, qi, si, q_offset_ref):
    return bi, block_mask.int_div(ni, groups), kv_block(qi, si, q_offset_ref), 0

  extra_specs, extra_args = _extra_inputs(
      spec, params, q_col, kv_row,
      pl.BlockSpec((None, bq, _LANES), lambda bi, ni, qi, si, r: (bi, qi, 0)),
      pl.BlockSpec((None, _SUBLANES, bk),
                   lambda bi, ni, qi, si, r: (bi, 0, kv_block(qi, si, r))))
  q_spec = pl.BlockSpec((None, None, bq, h), q_map)
  row_spec = pl.BlockSpec((None, None, 1, bq), row_map)
  kv_spec = pl.BlockSpec((None, None, bk, h), kv_map)
  out_specs, out_shape = [q_spec], [jax.ShapeDtypeStruct(q.shape, q.dtype)]
  scratch_shapes = [pltpu.VMEM((bq, h), jnp.float32)]
  if spec.bias is not None:  # per-row d(params), parameter p in lane p (of 128 or more)
    width = _LANES * common.cdiv(spec.num_bias_params, _LANES)
    out_specs.append(pl.BlockSpec((None, None, bq, width), q_map))
    out_shape.append(jax.ShapeDtypeStruct((b, n, tp, width), jnp.float32))
    scratch_shapes.append(pltpu.VMEM((bq, width), jnp.float32))
  dq, *dparams = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, n, tp // bq, block_mask.kv_steps_bound(spec)),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *extra_specs],
          out_specs=out_specs,
          scratch_shapes=scratch_shapes),
      out_shape=out_shape,
      compiler_params=common.compiler_params(
          "tpu", dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
          head_dim=h),
      interpret=interpret,
      name="flash_attention_dq",
  )(q_offset, q, k, v, do, lse, delta, *extra_args)

  # dk, dv: one program per KV block and KV head; the reduction axis walks (query head of the
  # group, visited query block), so GQA gradients are summed in the accumulator.
  q_steps = block_mask.q_steps_bound(spec)

  def q_block(kj, si, q_offset_ref):
    return block_mask.q_step_to_block(spec, kj, lax.rem(si, q_steps), q_offset_ref[0])[0]

  def head(ki, si):
    return ki * groups + lax.div(si, q_steps)

  def t_q_map(bi, ki, kj, si, q_offset_ref):
    return bi, head(ki, si), q_block(kj, si, q_offset_ref), 0

  def t_row_map(bi, ki, kj, si, q_offset_ref):
    return bi, head(ki, si), 0, q_block(kj, si, q_offset_ref)

  def t_kv_map(bi, ki, kj, si, q_offset_ref):
    del si, q_offset_ref
    return bi, ki, kj, 0

  extra_specs, extra_args = _extra_inputs(
      spec, params, q_row, kv_col,
      pl.BlockSpec((None, _SUBLANES, bq),
                   lambda bi, ki, kj, si, r: (bi, 0, q_block(kj, si, r))),
      pl.BlockSpec((None, bk, _LANES), lambda bi, ki, kj, si, r: (bi, kj, 0)))
  t_q_spec = pl.BlockSpec((None, None, bq, h), t_q_map)
  t_row_spec = pl.BlockSpec((None, None, 1, bq), t_row_map)
  t_kv_spec = pl.BlockSpec((None, None, bk, h), t_kv_map)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, groups=groups, q_steps=q_steps),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1,
          grid=(b, nk, sp // bk, groups * q_steps),
          in_specs=[t_kv_spec, t_kv_spec, t_q_spec, t_q_spec, t_row_spec, t_row_spec,
                    *extra_specs],
          out_specs=[t_kv_spec, t_kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=common.compiler_params(
          "tpu", dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
          head_dim=h),
      interpret=interpret,
      name="flash_attention_dkv",
  )(q_offset, k, v, q, do, lse, delta, *extra_args)
  return dq, dk, dv, dparams[0][..., :spec.num_bias_params] if dparams else None
