"""Decode attention kernel written for Mosaic TPU (also run by the interpreter).

Layout: the G = N // K query heads of a KV head and the T queries are folded into the rows of
one tile, q [B, K, R, H] with row r = g * T + t (R = G * T padded to a multiple of 8 sublanes),
so each K/V block is copied once per KV head and feeds a single matmul. K/V come either as the
cache itself viewed as [B, S, K * H] (a free reshape: block (bk, H) at column block kh, legal
when H is a multiple of 128 lanes or K == 1) or, for other head dims, as a head-major copy
[B, K, S, H] that the caller makes.

Grid (B, K, P, steps): partition p of the visited KV blocks (`block_mask.split_step_to_block`)
is reduced along the last, sequential axis. Cache lengths and query offsets are scalar-prefetch
operands, so the index maps read them before any copy; steps past a partition's share repeat
its last block, so the pipeline copies nothing and `pl.when` skips the compute. Row statistics
are lane-replicated [R, 128], as in the flash kernels.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import block_mask
from kernels_pallas import common
from kernels_pallas.flash import tiles as flash_tiles

_LANES = 128


def _kernel(cache_length_ref, q_offset_ref, shift_ref, q_ref, k_ref, v_ref, *refs, spec,
            num_splits):
  slopes_ref = refs[0] if spec.has_alibi else None
  o_ref, lse_ref, m_scr, l_scr, acc_scr = refs[1:] if spec.has_alibi else refs
  b, p, s = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  cache_length, q_offset = cache_length_ref[b], q_offset_ref[b]
  block, valid = block_mask.split_step_to_block(spec, num_splits, p, s, q_offset, cache_length)

  @pl.when(s == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, flash_tiles.MASK_VALUE, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(valid)
  def _step():
    kv_start = block * spec.block_k
    shape = (q_ref.shape[0], spec.block_k)
    # `tile_visibility` puts row r at r + q_offset; the per-row shift (r % T) - r moves the
    # folded rows to their query's index. Keys past the valid cache are hidden here.
    m, l, acc = flash_tiles.forward_tile(
        spec, q_ref[...], k_ref[...], v_ref[...], m_scr[:, 0:1], l_scr[:, 0:1], acc_scr[...],
        q_start=0, kv_start=kv_start, q_offset=q_offset + shift_ref[:, 0:1],
        bias_params=(slopes_ref[:, 0:1],) if spec.has_alibi else None,
        segment_visible=kv_start + lax.broadcasted_iota(jnp.int32, shape, 1) < cache_length)
    m_scr[...] = jnp.broadcast_to(m, m_scr.shape)
    l_scr[...] = jnp.broadcast_to(l, l_scr.shape)
    acc_scr[...] = acc

  @pl.when(s == pl.num_programs(3) - 1)
  def _finish():
    out, lse = flash_tiles.forward_finish(m_scr[:, 0:1], l_scr[:, 0:1], acc_scr[...])
    o_ref[...] = out
    lse_ref[...] = jnp.broadcast_to(lse, lse_ref.shape)


def fused_heads_layout(num_kv_heads: int, head_dim: int) -> bool:
  """Whether K/V can be read from the cache viewed as [B, S, K * H] (else head-major)."""
  return head_dim % _LANES == 0 or num_kv_heads == 1


def forward(spec, num_splits, q, k, v, cache_length, q_offset, shift, slopes, *, interpret):
  """Partial attention of each KV partition.

  Args:
    spec: static spec (q_length T, block_q T, kv_length S).
    num_splits: P.
    q: [B, K, R, H] folded queries.
    k, v: [B, Sp, K * H] (see `fused_heads_layout`) or [B, K, Sp, H]; Sp % block_k == 0.
    cache_length: [B] int32, clipped to [0, S].
    q_offset: [B] int32 absolute index of query 0.
    shift: [R] int32, (r % T) - r.
    slopes: [K, R] f32 per-row ALiBi slopes, or None.
    interpret: run the Pallas interpreter.

  Returns:
    out [B, K, P, R, H] f32 (normalised within each partition) and lse [B, K, P, R] f32.
  """
  b, nk, r, h = q.shape
  bk = spec.block_k

  def kv_block(bi, pi, si, cl_ref, qo_ref):
    return block_mask.split_step_to_block(spec, num_splits, pi, si, qo_ref[bi], cl_ref[bi])[0]

  if k.ndim == 3:
    kv_spec = pl.BlockSpec((None, bk, h), lambda bi, ki, pi, si, cl, qo: (
        bi, kv_block(bi, pi, si, cl, qo), ki))
  else:
    kv_spec = pl.BlockSpec((None, None, bk, h), lambda bi, ki, pi, si, cl, qo: (
        bi, ki, kv_block(bi, pi, si, cl, qo), 0))
  lanes = lambda x: lax.broadcast_in_dim(x, x.shape + (_LANES,), tuple(range(x.ndim)))
  in_specs = [pl.BlockSpec((r, _LANES), lambda *_: (0, 0)),
              pl.BlockSpec((None, None, r, h), lambda bi, ki, *_: (bi, ki, 0, 0)),
              kv_spec, kv_spec]
  args = [lanes(shift), q, k, v]
  if spec.has_alibi:
    in_specs.append(pl.BlockSpec((None, r, _LANES), lambda bi, ki, *_: (ki, 0, 0)))
    args.append(lanes(slopes))
  out_map = lambda bi, ki, pi, *_: (bi, ki, pi, 0, 0)
  out, lse = pl.pallas_call(
      functools.partial(_kernel, spec=spec, num_splits=num_splits),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, nk, num_splits, block_mask.split_steps_bound(spec, num_splits)),
          in_specs=in_specs,
          out_specs=[pl.BlockSpec((None, None, None, r, h), out_map),
                     pl.BlockSpec((None, None, None, r, _LANES), out_map)],
          scratch_shapes=[pltpu.VMEM((r, _LANES), jnp.float32),
                          pltpu.VMEM((r, _LANES), jnp.float32),
                          pltpu.VMEM((r, h), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, nk, num_splits, r, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, nk, num_splits, r, _LANES), jnp.float32)],
      compiler_params=common.compiler_params(
          "tpu", dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
          head_dim=h),
      interpret=interpret,
      name="decode_attention",
  )(cache_length, q_offset, *args)
  return out, lse[..., 0]
