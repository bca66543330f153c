"""Chunked linear attention kernels written for Triton on GPU (also run by the interpreter).

Layout as in the TPU variant, except that the cumulative log decay is [B, N, Tp] (Triton has
1-D vectors; per channel [B, N, Tp, Dk] as on TPU) and every feature dim is a power of two
>= 16 (the wrapper pads with zeros).
Triton has no sequential grid axes, so each program owns one (batch, head) and walks the chunks
in a loop, carrying the [Dk, Dv] f32 state in registers; the sequence blocks stay in global
memory and the body loads one chunk at a time with `pl.ds`.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import common
from kernels_pallas.linear import tiles as tiles
from kernels_pallas.linear.tpu import kv_head


def _specs(spec, tp, dk, dv):
  """BlockSpecs (q-like, k-like, v-like, decay, state) for grid (B, N): whole sequences."""
  g = spec.groups
  return (pl.BlockSpec((None, None, tp, dk), lambda b, n: (b, n, 0, 0)),
          pl.BlockSpec((None, None, tp, dk), lambda b, n: (b, kv_head(n, g), 0, 0)),
          pl.BlockSpec((None, None, tp, dv), lambda b, n: (b, kv_head(n, g), 0, 0)),
          (pl.BlockSpec((None, None, tp, dk), lambda b, n: (b, n, 0, 0)) if spec.per_channel
           else pl.BlockSpec((None, None, tp), lambda b, n: (b, n, 0))),
          pl.BlockSpec((None, None, dk, dv), lambda b, n: (b, n, 0, 0)))


def _params(dk, dv):
  return common.compiler_params("gpu", dimension_semantics=("parallel",) * 2,
                                head_dim=max(dk, dv))


def _chunk(spec, i):
  return pl.ds(pl.multiple_of(i * spec.chunk, spec.chunk), spec.chunk)


def _decay_views(spec, b_ref, rows):
  """The chunk's decay views (`tiles.chunk_forward`); without a decay the tile maths reads
  none of them."""
  if spec.per_channel:
    return tiles.channel_views(b_ref[rows, :])
  return tiles.vector_views(b_ref[rows]) if spec.has_decay else (None, None, None)


def _fwd_kernel(q_ref, k_ref, v_ref, b_ref, s0_ref, o_ref, st_ref, *, spec, num_chunks):
  def body(i, state):
    rows = _chunk(spec, i)
    out, state = tiles.chunk_forward(spec, q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                                     state, _decay_views(spec, b_ref, rows))
    o_ref[rows, :] = out.astype(o_ref.dtype)
    return state

  st_ref[...] = lax.fori_loop(0, num_chunks, body, s0_ref[...])


def forward(spec, q, k, v, b, s0, *, interpret):
  """Output [B, N, Tp, Dv] in v.dtype and final state [B, N, Dk, Dv] f32.

  Args: as for `linear_attention_tpu.forward`.
  """
  bsz, n, tp, dk = q.shape
  dv = v.shape[-1]
  q_spec, k_spec, v_spec, b_spec, s_spec = _specs(spec, tp, dk, dv)
  o_spec = pl.BlockSpec((None, None, tp, dv), lambda b_, n_: (b_, n_, 0, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec, num_chunks=tp // spec.chunk),
      grid=(bsz, n),
      in_specs=[q_spec, k_spec, v_spec, b_spec, s_spec],
      out_specs=[o_spec, s_spec],
      out_shape=[jax.ShapeDtypeStruct((bsz, n, tp, dv), v.dtype),
                 jax.ShapeDtypeStruct((bsz, n, dk, dv), jnp.float32)],
      compiler_params=_params(dk, dv),
      interpret=interpret,
      name="linear_attention_fwd",
  )(q, k, v, b, s0)


def _dq_kernel(k_ref, v_ref, do_ref, b_ref, s0_ref, dq_ref, *, spec, num_chunks):
  def body(i, state):
    rows = _chunk(spec, i)
    views = _decay_views(spec, b_ref, rows)
    k, v = k_ref[rows, :], v_ref[rows, :]
    dq_ref[rows, :] = tiles.chunk_dq(spec, k, v, do_ref[rows, :], state, views)
    return tiles.chunk_next_state(spec, k, v, state, views)

  lax.fori_loop(0, num_chunks, body, s0_ref[...])


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, dst_ref, dk_ref, dv_ref, ds0_ref, *, spec,
                num_chunks):
  def body(i, dstate):
    rows = _chunk(spec, num_chunks - 1 - i)
    dk, dv, dstate = tiles.chunk_dkv(spec, q_ref[rows, :], k_ref[rows, :], v_ref[rows, :],
                                     do_ref[rows, :], dstate, _decay_views(spec, b_ref, rows))
    dk_ref[rows, :] = dk
    dv_ref[rows, :] = dv
    return dstate

  ds0_ref[...] = lax.fori_loop(0, num_chunks, body, dst_ref[...])


def backward(spec, q, k, v, b, s0, do, dst, *, interpret):
  """Gradients of the chunked pass, all f32: as for `linear_attention_tpu.backward`."""
  bsz, n, tp, dk = q.shape
  dv = v.shape[-1]
  num_chunks = tp // spec.chunk
  q_spec, k_spec, v_spec, b_spec, s_spec = _specs(spec, tp, dk, dv)
  do_spec = pl.BlockSpec((None, None, tp, dv), lambda b_, n_: (b_, n_, 0, 0))
  f32 = jnp.float32
  kwargs = dict(grid=(bsz, n), compiler_params=_params(dk, dv), interpret=interpret)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, num_chunks=num_chunks),
      in_specs=[k_spec, v_spec, do_spec, b_spec, s_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, f32),
      name="linear_attention_dq",
      **kwargs,
  )(k, v, do, b, s0)
  dk_, dv_, ds0 = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, num_chunks=num_chunks),
      in_specs=[q_spec, k_spec, v_spec, do_spec, b_spec, s_spec],
      out_specs=[q_spec, do_spec, s_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, f32),
                 jax.ShapeDtypeStruct((bsz, n, tp, dv), f32),
                 jax.ShapeDtypeStruct(s0.shape, f32)],
      name="linear_attention_dkv",
      **kwargs,
  )(q, k, v, do, b, dst)
  return dq, dk_, dv_, ds0
