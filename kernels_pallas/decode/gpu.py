"""Decode attention kernel written for Triton on GPU (also run by the interpreter).

Layout as in the TPU variant: the G query heads of a KV head and the T queries are folded into
the rows of one tile, q [B, K, R, H] with row r = g * T + t (R a power of two >= 16, Triton's
smallest dot). K/V are read from the cache [B, S, K, H] itself: one program per (batch, KV head,
partition) sees its head's whole sequence in global memory and loads only the blocks of its
share of the visited blocks with `pl.ds`, so skipped blocks are neither loaded nor computed.
Triton has no sequential grid axes, so each partition's reduction is a loop inside the body: one
over its share of the global-token blocks and one over its share of the local blocks.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import block_mask
from kernels_pallas import common
from kernels_pallas.flash import tiles as flash_tiles


def _kernel(cache_length_ref, q_offset_ref, shift_ref, q_ref, k_ref, v_ref, *refs, spec,
            num_splits):
  slopes_ref = refs[0] if spec.has_alibi else None
  o_ref, lse_ref = refs[1:] if spec.has_alibi else refs
  b, p = pl.program_id(0), pl.program_id(2)
  cache_length, q_offset = cache_length_ref[b], q_offset_ref[b]
  bk = spec.block_k
  q = q_ref[...]
  # `tile_visibility` puts row r at r + q_offset; the per-row shift (r % T) - r moves the folded
  # rows to their query's index.
  row_offset = q_offset + shift_ref[...][:, None]
  bias_params = (slopes_ref[...][:, None],) if spec.has_alibi else None
  g_hi, lo, hi = block_mask.decode_kv_ranges(spec, q_offset, cache_length)
  start, end = block_mask.split_range(g_hi + hi - lo, num_splits, p)

  def body(j, carry):
    kv = pl.ds(pl.multiple_of(j * bk, bk), bk)
    cols = j * bk + lax.broadcasted_iota(jnp.int32, (q.shape[0], bk), 1)
    return flash_tiles.forward_tile(
        spec, q, k_ref[kv, :], v_ref[kv, :], *carry, q_start=0, kv_start=j * bk,
        q_offset=row_offset, bias_params=bias_params, segment_visible=cols < cache_length)

  carry = (jnp.full((q.shape[0], 1), flash_tiles.MASK_VALUE, jnp.float32),
           jnp.zeros((q.shape[0], 1), jnp.float32), jnp.zeros(q.shape, jnp.float32))
  # Visited step v is block v for v < g_hi (global tokens) and block lo + v - g_hi after.
  if spec.global_tokens:
    carry = lax.fori_loop(start, jnp.minimum(end, g_hi), body, carry)
  carry = lax.fori_loop(lo + jnp.maximum(start, g_hi) - g_hi, lo + end - g_hi, body, carry)
  out, lse = flash_tiles.forward_finish(*carry)
  o_ref[...] = out
  lse_ref[...] = lse[:, 0]


def forward(spec, num_splits, q, k, v, cache_length, q_offset, shift, slopes, *, interpret):
  """Partial attention of each KV partition.

  Args:
    spec: static spec (q_length T, block_q T, kv_length S).
    num_splits: P.
    q: [B, K, R, H] folded queries (R and H powers of two >= 16).
    k, v: [B, Sp, K, H] caches; Sp % block_k == 0.
    cache_length: [B] int32, clipped to [0, S].
    q_offset: [B] int32 absolute index of query 0.
    shift: [R] int32, (r % T) - r.
    slopes: [K, R] f32 per-row ALiBi slopes, or None.
    interpret: run the Pallas interpreter.

  Returns:
    out [B, K, P, R, H] f32 (normalised within each partition) and lse [B, K, P, R] f32.
  """
  b, nk, r, h = q.shape
  sp = k.shape[1]
  batch_spec = pl.BlockSpec((b,), lambda *_: (0,))
  in_specs = [batch_spec, batch_spec, pl.BlockSpec((r,), lambda *_: (0,)),
              pl.BlockSpec((None, None, r, h), lambda bi, ki, pi: (bi, ki, 0, 0)),
              pl.BlockSpec((None, sp, None, h), lambda bi, ki, pi: (bi, 0, ki, 0)),
              pl.BlockSpec((None, sp, None, h), lambda bi, ki, pi: (bi, 0, ki, 0))]
  args = [cache_length, q_offset, shift, q, k, v]
  if spec.has_alibi:
    in_specs.append(pl.BlockSpec((None, r), lambda bi, ki, pi: (ki, 0)))
    args.append(slopes)
  return pl.pallas_call(
      functools.partial(_kernel, spec=spec, num_splits=num_splits),
      grid=(b, nk, num_splits),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, None, None, r, h), lambda bi, ki, pi: (bi, ki, pi, 0, 0)),
                 pl.BlockSpec((None, None, None, r), lambda bi, ki, pi: (bi, ki, pi, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, nk, num_splits, r, h), jnp.float32),
                 jax.ShapeDtypeStruct((b, nk, num_splits, r), jnp.float32)],
      compiler_params=common.compiler_params(
          "gpu", dimension_semantics=("parallel",) * 3, head_dim=h),
      interpret=interpret,
      name="decode_attention",
  )(*args)
