"""Selective scan kernels written for Mosaic TPU (also run by the interpreter).

Layout: u, delta, dy [Bt, Lp, Dp] (channels on lanes); A^T [P, Dp]; B, C [Bt, G, Lp, P] f32;
D, bias [1, Dp]; states [Bt, P, Dp] (state on sublanes, channels on lanes, so a state tile of
P = 16 by 128 channels is two f32 vregs). Grid (batch, channel block, chunk): the chunk axis is
sequential ("arbitrary") and carries the state in VMEM scratch; the other two are parallel.

Per chunk, everything that does not depend on the state (dt, dt * u, the D skip, d(delta)) is
computed as whole [chunk, Dc] tiles; only the recurrence itself is a loop over time steps, which
reads one row of the chunk's scratch per step (a dynamic sublane offset).

The backward pass walks the chunks in reverse (index maps read chunk nc - 1 - c). Each chunk
first recomputes its states from the start state saved by the forward pass into a [chunk, P, Dc]
VMEM scratch, then runs the adjoint recurrence backwards through it; so HBM holds only the
chunk-start states, [Bt, nc, P, Dp].
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import common
from kernels_pallas.scan import tiles as tiles

_f32 = jnp.float32


def _valid_rows(spec, chunk_index, shape):
  """[chunk, Dc] mask of the steps t < L of a chunk (later steps are padding)."""
  return lax.broadcasted_iota(jnp.int32, shape, 0) + chunk_index * spec.chunk < spec.length


def _lane_sum(row, mat):
  """sum_Dc row * mat as a [1, P] row: [1, Dc] x [P, Dc]^T on the MXU, at full f32 precision.

  A lane reduction would leave the result as a [P, 1] column, and storing a column into a row
  of the [chunk, P] output would need a relayout per step; the transposed-rhs matmul gives the
  row directly.
  """
  return lax.dot_general(row, mat, (((1,), (1,)), ((), ())), preferred_element_type=_f32,
                         precision=lax.Precision.HIGHEST)


def _specs(spec, p, chunk_map):
  """BlockSpecs of the operands; `chunk_map(ci)` is the chunk a grid step works on."""
  bd, ch = spec.block_d, spec.chunk
  return dict(
      x=pl.BlockSpec((None, ch, bd), lambda bi, di, ci: (bi, chunk_map(ci), di)),
      a=pl.BlockSpec((p, bd), lambda bi, di, ci: (0, di)),
      bc=pl.BlockSpec((None, None, ch, p),
                      lambda bi, di, ci: (bi, spec.group(di), chunk_map(ci), 0)),
      row=pl.BlockSpec((1, bd), lambda bi, di, ci: (0, di)),
      state=pl.BlockSpec((None, p, bd), lambda bi, di, ci: (bi, 0, di)),
      saved=pl.BlockSpec((None, None, p, bd), lambda bi, di, ci: (bi, chunk_map(ci), 0, di)),
      part=pl.BlockSpec((None, None, ch, p), lambda bi, di, ci: (bi, di, chunk_map(ci), 0)),
      acc=pl.BlockSpec((None, 1, bd), lambda bi, di, ci: (bi, 0, di)))


def _fwd_kernel(u_ref, delta_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, h0_ref, y_ref, ht_ref,
                *refs, spec, save_states):
  states_ref = refs[0] if save_states else None
  h_scr, dt_scr, w_scr, y_scr = refs[-4:]
  ci = pl.program_id(2)

  @pl.when(ci == 0)
  def _init():
    h_scr[...] = h0_ref[...]

  if save_states:
    states_ref[...] = h_scr[...]
  u = u_ref[...].astype(_f32)
  dt = tiles.discretize(delta_ref[...], bias_ref[...], use_softplus=spec.use_softplus)
  dt = jnp.where(_valid_rows(spec, ci, dt.shape), dt, 0.0)  # padding leaves the state alone
  dt_scr[...] = dt
  w_scr[...] = dt * u
  a_mat = a_ref[...]

  def step(t, h):
    row = pl.ds(t, 1)
    h, y = tiles.forward_step(h, a_mat, dt_scr[row, :], w_scr[row, :], b_ref[t][:, None],
                              c_ref[t][:, None])
    y_scr[row, :] = y
    return h

  h = lax.fori_loop(0, spec.chunk, step, h_scr[...], unroll=spec.unroll)
  h_scr[...] = h
  y_ref[...] = (y_scr[...] + d_ref[...] * u).astype(y_ref.dtype)

  @pl.when(ci == pl.num_programs(2) - 1)
  def _final():
    ht_ref[...] = h


def forward(spec, u, delta, a_t, b, c, d_skip, bias, h0, *, save_states, interpret):
  """Returns y [Bt, Lp, Dp] (u.dtype), h_T [Bt, P, Dp] f32 and, with `save_states`, the state
  at the start of every chunk [Bt, nc, P, Dp] f32."""
  bt, lp, dp = u.shape
  p, nc = a_t.shape[0], lp // spec.chunk
  s = _specs(spec, p, lambda ci: ci)
  out_specs = [s["x"], s["state"]]
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(h0.shape, _f32)]
  if save_states:
    out_specs.append(s["saved"])
    out_shape.append(jax.ShapeDtypeStruct((bt, nc, p, dp), _f32))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec, save_states=save_states),
      grid=(bt, dp // spec.block_d, nc),
      in_specs=[s["x"], s["x"], s["a"], s["bc"], s["bc"], s["row"], s["row"], s["state"]],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((p, spec.block_d), _f32)]
      + [pltpu.VMEM((spec.chunk, spec.block_d), _f32)] * 3,
      compiler_params=common.compiler_params(
          "tpu", dimension_semantics=("parallel", "parallel", "arbitrary"), head_dim=p),
      interpret=interpret,
      name="selective_scan_fwd",
  )(u, delta, a_t, b, c, d_skip, bias, h0)


def _bwd_kernel(u_ref, delta_ref, dy_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, start_ref,
                dht_ref, du_ref, ddelta_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref, dh0_ref,
                g_scr, hs_scr, dt_scr, w_scr, dy_scr, gb_scr, ga_scr, *, spec):
  ci = pl.program_id(2)
  chunk_index = pl.num_programs(2) - 1 - ci

  @pl.when(ci == 0)
  def _init():
    g_scr[...] = dht_ref[...]
    da_ref[...] = jnp.zeros(da_ref.shape, _f32)
    dd_ref[...] = jnp.zeros(dd_ref.shape, _f32)
    dbias_ref[...] = jnp.zeros(dbias_ref.shape, _f32)

  u, dy = u_ref[...].astype(_f32), dy_ref[...].astype(_f32)
  valid = _valid_rows(spec, chunk_index, u.shape)
  dt = tiles.discretize(delta_ref[...], bias_ref[...], use_softplus=spec.use_softplus)
  dt = jnp.where(valid, dt, 0.0)
  dt_scr[...] = dt
  w_scr[...] = dt * u
  dy_scr[...] = dy
  a_mat = a_ref[...]

  def recompute(t, h):
    hs_scr[t] = h
    return tiles.forward_step(h, a_mat, dt_scr[pl.ds(t, 1), :], w_scr[pl.ds(t, 1), :],
                              b_ref[t][:, None], c_ref[t][:, None])[0]

  lax.fori_loop(0, spec.chunk, recompute, start_ref[...], unroll=spec.unroll)

  def reverse(i, carry):
    g_next, da = carry
    t = spec.chunk - 1 - i
    row = pl.ds(t, 1)
    dt_t, w_t, dy_t = dt_scr[row, :], w_scr[row, :], dy_scr[row, :]
    g_prev, h, g, da_t, gb, ga = tiles.backward_step(
        g_next, hs_scr[t], a_mat, dt_t, w_t, b_ref[t][:, None], c_ref[t][:, None], dy_t)
    db_ref[row, :] = _lane_sum(w_t, g)
    dc_ref[row, :] = _lane_sum(dy_t, h)
    gb_scr[row, :] = gb
    ga_scr[row, :] = ga
    return g_prev, da + da_t

  g, da = lax.fori_loop(0, spec.chunk, reverse, (g_scr[...], jnp.zeros(a_mat.shape, _f32)),
                        unroll=spec.unroll)
  g_scr[...] = g
  da_ref[...] += da
  gb = gb_scr[...]
  du_ref[...] = (dt * gb + d_ref[...] * dy).astype(du_ref.dtype)
  ddelta = tiles.delta_grad(ga_scr[...] + u * gb, delta_ref[...], bias_ref[...],
                            use_softplus=spec.use_softplus)
  ddelta = jnp.where(valid, ddelta, 0.0)
  ddelta_ref[...] = ddelta.astype(ddelta_ref.dtype)
  dd_ref[...] += jnp.sum(dy * u, axis=0, keepdims=True)
  dbias_ref[...] += jnp.sum(ddelta, axis=0, keepdims=True)

  @pl.when(ci == pl.num_programs(2) - 1)
  def _final():
    dh0_ref[...] = g


def backward(spec, u, delta, dy, a_t, b, c, d_skip, bias, starts, dht, *, interpret):
  """Gradients of the padded scan.

  Args:
    spec: the forward's `ScanSpec`.
    u, delta, a_t, b, c, d_skip, bias: the forward's operands.
    dy: [Bt, Lp, Dp] cotangent of y.
    starts: [Bt, nc, P, Dp] f32 chunk-start states saved by `forward`.
    dht: [Bt, P, Dp] f32 cotangent of the final state.

  Returns:
    du, ddelta [Bt, Lp, Dp] (their inputs' dtypes); dB, dC [Bt, nd, Lp, P] f32 partial sums
    per channel block; dA^T [Bt, P, Dp], dD [Bt, 1, Dp], dbias [Bt, 1, Dp] f32 per batch row;
    dh0 [Bt, P, Dp] f32.
  """
  bt, lp, dp = u.shape
  p, nc, nd = a_t.shape[0], lp // spec.chunk, dp // spec.block_d
  s = _specs(spec, p, lambda ci: nc - 1 - ci)
  f32_out = lambda shape: jax.ShapeDtypeStruct(shape, _f32)  # noqa: E731
  chunk_tile = pltpu.VMEM((spec.chunk, spec.block_d), _f32)
  return pl.pallas_call(
      functools.partial(_bwd_kernel, spec=spec),
      grid=(bt, nd, nc),
      in_specs=[s["x"], s["x"], s["x"], s["a"], s["bc"], s["bc"], s["row"], s["row"],
                s["saved"], s["state"]],
      out_specs=[s["x"], s["x"], s["part"], s["part"], s["state"], s["acc"], s["acc"],
                 s["state"]],
      out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                 jax.ShapeDtypeStruct(delta.shape, delta.dtype),
                 f32_out((bt, nd, lp, p)), f32_out((bt, nd, lp, p)), f32_out((bt, p, dp)),
                 f32_out((bt, 1, dp)), f32_out((bt, 1, dp)), f32_out((bt, p, dp))],
      scratch_shapes=[pltpu.VMEM((p, spec.block_d), _f32),
                      pltpu.VMEM((spec.chunk, p, spec.block_d), _f32)] + [chunk_tile] * 5,
      compiler_params=common.compiler_params(
          "tpu", dimension_semantics=("parallel", "parallel", "arbitrary"), head_dim=p),
      interpret=interpret,
      name="selective_scan_bwd",
  )(u, delta, dy, a_t, b, c, d_skip, bias, starts, dht)
