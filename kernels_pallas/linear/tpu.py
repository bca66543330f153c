"""Chunked linear attention kernels written for Mosaic TPU (also run by the interpreter).

Layout: q [B, N, Tp, Dk]; k [B, K, Tp, Dk], v [B, K, Tp, Dv] (query head n reads key/value
head n // G through the index maps); the within-chunk cumulative log decay as rows
[B, N, 1, Tp] (positions on lanes), or per channel as [B, N, Tp, Dk] blocks shaped like q;
states [B, N, Dk, Dv] f32.

Grid (B, N, chunks): the chunk axis is sequential ("arbitrary") and the state lives in a VMEM
scratch [Dk, Dv] f32 that carries from one chunk to the next; the final state's output block has
the same index for every chunk, so it is written back once, after the last. The dk/dv pass walks
the chunks in reverse through its index maps.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import common
from kernels_pallas.linear import tiles as tiles

_SEMANTICS = ("parallel", "parallel", "arbitrary")


def kv_head(n, groups: int):
  """Key/value head of query head n (truncating division: cheaper than floor division)."""
  return n if groups == 1 else lax.div(n, jnp.int32(groups))


def _specs(spec, dk, dv, num_chunks, reverse=False):
  """BlockSpecs (q-like, k-like, v-like, decay row, state) for grid (B, N, chunks)."""
  c, g = spec.chunk, spec.groups
  chunk = (lambda i: num_chunks - 1 - i) if reverse else (lambda i: i)
  return (pl.BlockSpec((None, None, c, dk), lambda b, n, i: (b, n, chunk(i), 0)),
          pl.BlockSpec((None, None, c, dk), lambda b, n, i: (b, kv_head(n, g), chunk(i), 0)),
          pl.BlockSpec((None, None, c, dv), lambda b, n, i: (b, kv_head(n, g), chunk(i), 0)),
          (pl.BlockSpec((None, None, c, dk), lambda b, n, i: (b, n, chunk(i), 0))
           if spec.per_channel else
           pl.BlockSpec((None, None, 1, c), lambda b, n, i: (b, n, 0, chunk(i)))),
          pl.BlockSpec((None, None, dk, dv), lambda b, n, i: (b, n, 0, 0)))


def _views(spec, b_ref):
  """The chunk's decay views (`tiles.chunk_forward`): per-channel tile or row."""
  if spec.per_channel:
    return tiles.channel_views(b_ref[...])
  b_row = b_ref[...]
  b_col, b_last = tiles.row_views(b_row)
  return b_col, b_row, b_last


def _decay_operand(spec, b):
  """[B, N, Tp, Dk] per channel as it is; a scalar decay [B, N, Tp] as rows [B, N, 1, Tp]."""
  return b if spec.per_channel else b[:, :, None, :]


def _params(dk, dv):
  return common.compiler_params("tpu", dimension_semantics=_SEMANTICS, head_dim=max(dk, dv))


def _fwd_kernel(q_ref, k_ref, v_ref, b_ref, s0_ref, o_ref, st_ref, state_scr, *, spec):
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _init():
    state_scr[...] = s0_ref[...]

  out, state = tiles.chunk_forward(spec, q_ref[...], k_ref[...], v_ref[...], state_scr[...],
                                   _views(spec, b_ref))
  o_ref[...] = out.astype(o_ref.dtype)
  state_scr[...] = state

  @pl.when(i == pl.num_programs(2) - 1)
  def _finish():
    st_ref[...] = state


def forward(spec, q, k, v, b, s0, *, interpret):
  """Output [B, N, Tp, Dv] in v.dtype and final state [B, N, Dk, Dv] f32.

  Args:
    spec: the static `LinearSpec`.
    q: [B, N, Tp, Dk]; k: [B, K, Tp, Dk]; v: [B, K, Tp, Dv].
    b: [B, N, Tp] (or [B, N, Tp, Dk] per channel) f32 within-chunk inclusive cumulative log
      decay.
    s0: [B, N, Dk, Dv] f32 initial state.
    interpret: run the Pallas interpreter.
  """
  bsz, n, tp, dk = q.shape
  dv = v.shape[-1]
  num_chunks = tp // spec.chunk
  q_spec, k_spec, v_spec, b_spec, s_spec = _specs(spec, dk, dv, num_chunks)
  o_spec = pl.BlockSpec((None, None, spec.chunk, dv), lambda b_, n_, i: (b_, n_, i, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec),
      grid=(bsz, n, num_chunks),
      in_specs=[q_spec, k_spec, v_spec, b_spec, s_spec],
      out_specs=[o_spec, s_spec],
      out_shape=[jax.ShapeDtypeStruct((bsz, n, tp, dv), v.dtype),
                 jax.ShapeDtypeStruct((bsz, n, dk, dv), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)],
      compiler_params=_params(dk, dv),
      interpret=interpret,
      name="linear_attention_fwd",
  )(q, k, v, _decay_operand(spec, b), s0)


def _dq_kernel(k_ref, v_ref, do_ref, b_ref, s0_ref, dq_ref, state_scr, *, spec):
  @pl.when(pl.program_id(2) == 0)
  def _init():
    state_scr[...] = s0_ref[...]

  views = _views(spec, b_ref)
  k, v, state = k_ref[...], v_ref[...], state_scr[...]
  dq_ref[...] = tiles.chunk_dq(spec, k, v, do_ref[...], state, views)
  state_scr[...] = tiles.chunk_next_state(spec, k, v, state, views)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, b_ref, dst_ref, dk_ref, dv_ref, ds0_ref, dstate_scr,
                *, spec):
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _init():
    dstate_scr[...] = dst_ref[...]

  dk, dv, dstate = tiles.chunk_dkv(spec, q_ref[...], k_ref[...], v_ref[...], do_ref[...],
                                   dstate_scr[...], _views(spec, b_ref))
  dk_ref[...] = dk
  dv_ref[...] = dv
  dstate_scr[...] = dstate

  @pl.when(i == pl.num_programs(2) - 1)
  def _finish():
    ds0_ref[...] = dstate


def backward(spec, q, k, v, b, s0, do, dst, *, interpret):
  """Gradients of the chunked pass, all f32.

  Args:
    do: [B, N, Tp, Dv] output cotangent; dst: [B, N, Dk, Dv] f32 final state cotangent.
    (others as for `forward`.)

  Returns:
    dq [B, N, Tp, Dk]; dk [B, N, Tp, Dk] and dv [B, N, Tp, Dv] per query head (the caller sums
    each group); d initial state [B, N, Dk, Dv].
  """
  bsz, n, tp, dk = q.shape
  dv = v.shape[-1]
  num_chunks = tp // spec.chunk
  b = _decay_operand(spec, b)
  grid = (bsz, n, num_chunks)
  f32 = jnp.float32

  # dq runs forwards in time, rebuilding the state that enters each chunk.
  q_spec, k_spec, v_spec, b_spec, s_spec = _specs(spec, dk, dv, num_chunks)
  do_spec = pl.BlockSpec((None, None, spec.chunk, dv), lambda b_, n_, i: (b_, n_, i, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec),
      grid=grid,
      in_specs=[k_spec, v_spec, do_spec, b_spec, s_spec],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, f32),
      scratch_shapes=[pltpu.VMEM((dk, dv), f32)],
      compiler_params=_params(dk, dv),
      interpret=interpret,
      name="linear_attention_dq",
  )(k, v, do, b, s0)

  # dk, dv run backwards in time, carrying the state cotangent.
  q_spec, k_spec, v_spec, b_spec, s_spec = _specs(spec, dk, dv, num_chunks, reverse=True)
  do_spec = pl.BlockSpec((None, None, spec.chunk, dv),
                         lambda b_, n_, i: (b_, n_, num_chunks - 1 - i, 0))
  dk_, dv_, ds0 = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec),
      grid=grid,
      in_specs=[q_spec, k_spec, v_spec, do_spec, b_spec, s_spec],
      out_specs=[q_spec, do_spec, s_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, f32),
                 jax.ShapeDtypeStruct((bsz, n, tp, dv), f32),
                 jax.ShapeDtypeStruct(s0.shape, f32)],
      scratch_shapes=[pltpu.VMEM((dk, dv), f32)],
      compiler_params=_params(dk, dv),
      interpret=interpret,
      name="linear_attention_dkv",
  )(q, k, v, do, b, dst)
  return dq, dk_, dv_, ds0
