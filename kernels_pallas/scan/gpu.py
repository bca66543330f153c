"""Selective scan kernels written for Triton on GPU (also run by the interpreter).

Layout as in the TPU variant: u, delta, dy [Bt, Lp, Dp]; A^T [Pp, Dp]; B, C [Bt, G, Lp, Pp] f32;
D, bias [1, Dp]; states [Bt, Pp, Dp], with the state size padded to a power of two (Triton's
tiles). Triton has no sequential grid axes, so each program owns one (batch row, channel block)
for the whole sequence and loops over chunks and steps in its body, with the [Pp, Dc] state in
registers; operands are whole-sequence blocks left in global memory, read one step (row) at a
time.

The backward pass has no scratch memory to hold a chunk's recomputed states, so they go to a
per-program global workspace [chunk, Pp, Dc] (an extra output the caller drops), written by the
recompute loop and read back by the reverse loop; barriers order the two loops.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels_pallas import common
from kernels_pallas.scan import tiles as tiles

_f32 = jnp.float32


def _specs(spec, lp, pp, nc):
  bd = spec.block_d
  return dict(
      x=pl.BlockSpec((None, lp, bd), lambda bi, di: (bi, 0, di)),
      a=pl.BlockSpec((pp, bd), lambda bi, di: (0, di)),
      bc=pl.BlockSpec((None, None, lp, pp), lambda bi, di: (bi, spec.group(di), 0, 0)),
      row=pl.BlockSpec((1, bd), lambda bi, di: (0, di)),
      state=pl.BlockSpec((None, pp, bd), lambda bi, di: (bi, 0, di)),
      saved=pl.BlockSpec((None, nc, pp, bd), lambda bi, di: (bi, 0, 0, di)),
      part=pl.BlockSpec((None, None, lp, pp), lambda bi, di: (bi, di, 0, 0)),
      acc=pl.BlockSpec((None, 1, bd), lambda bi, di: (bi, 0, di)),
      work=pl.BlockSpec((None, None, spec.chunk, pp, bd), lambda bi, di: (bi, di, 0, 0, 0)))


def _step_inputs(spec, t, u_ref, delta_ref, bias):
  """Row t: (u, raw delta, dt, dt * u), each [1, Dc] f32; dt = 0 on padded steps."""
  row = pl.ds(t, 1)
  u, delta = u_ref[row, :].astype(_f32), delta_ref[row, :]
  dt = tiles.discretize(delta, bias, use_softplus=spec.use_softplus)
  dt = jnp.where(t < spec.length, dt, 0.0)
  return u, delta, dt, dt * u


def _fwd_kernel(u_ref, delta_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, h0_ref, y_ref, ht_ref,
                *states_ref, spec, num_chunks):
  a_mat, d_row, bias = a_ref[...], d_ref[...], bias_ref[...]

  def chunk_body(ci, h):
    if states_ref:
      states_ref[0][ci] = h

    def step(i, h):
      t = ci * spec.chunk + i
      u, _, dt, w = _step_inputs(spec, t, u_ref, delta_ref, bias)
      h, y = tiles.forward_step(h, a_mat, dt, w, b_ref[t][:, None], c_ref[t][:, None])
      y_ref[pl.ds(t, 1), :] = (y + d_row * u).astype(y_ref.dtype)
      return h

    return lax.fori_loop(0, spec.chunk, step, h, unroll=spec.unroll)

  ht_ref[...] = lax.fori_loop(0, num_chunks, chunk_body, h0_ref[...])


def forward(spec, u, delta, a_t, b, c, d_skip, bias, h0, *, save_states, interpret):
  """Returns y [Bt, Lp, Dp] (u.dtype), h_T [Bt, Pp, Dp] f32 and, with `save_states`, the state
  at the start of every chunk [Bt, nc, Pp, Dp] f32."""
  bt, lp, dp = u.shape
  pp, nc = a_t.shape[0], lp // spec.chunk
  s = _specs(spec, lp, pp, nc)
  out_specs = [s["x"], s["state"]]
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype), jax.ShapeDtypeStruct(h0.shape, _f32)]
  if save_states:
    out_specs.append(s["saved"])
    out_shape.append(jax.ShapeDtypeStruct((bt, nc, pp, dp), _f32))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec, num_chunks=nc),
      grid=(bt, dp // spec.block_d),
      in_specs=[s["x"], s["x"], s["a"], s["bc"], s["bc"], s["row"], s["row"], s["state"]],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=common.compiler_params(
          "gpu", dimension_semantics=("parallel", "parallel"), head_dim=spec.block_d),
      interpret=interpret,
      name="selective_scan_fwd",
  )(u, delta, a_t, b, c, d_skip, bias, h0)


def _bwd_kernel(u_ref, delta_ref, dy_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, start_ref,
                dht_ref, du_ref, ddelta_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref, dh0_ref,
                hs_ref, *, spec, num_chunks, interpret):
  a_mat, d_row, bias = a_ref[...], d_ref[...], bias_ref[...]

  def barrier():
    # Every thread must see the whole workspace written before reading it (and read it all
    # before the next chunk overwrites it). The interpreter runs one program serially.
    if not interpret:
      from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
      plgpu.debug_barrier()

  def chunk_body(k, carry):
    ci = num_chunks - 1 - k

    def recompute(i, h):
      hs_ref[i] = h
      t = ci * spec.chunk + i
      _, _, dt, w = _step_inputs(spec, t, u_ref, delta_ref, bias)
      return tiles.forward_step(h, a_mat, dt, w, b_ref[t][:, None], c_ref[t][:, None])[0]

    lax.fori_loop(0, spec.chunk, recompute, start_ref[ci], unroll=spec.unroll)
    barrier()

    def reverse(j, carry):
      g_next, da, dd, dbias = carry
      i = spec.chunk - 1 - j
      t = ci * spec.chunk + i
      row = pl.ds(t, 1)
      u, delta, dt, w = _step_inputs(spec, t, u_ref, delta_ref, bias)
      dy = dy_ref[row, :].astype(_f32)
      g_prev, h, g, da_t, gb, ga = tiles.backward_step(
          g_next, hs_ref[i], a_mat, dt, w, b_ref[t][:, None], c_ref[t][:, None], dy)
      db_ref[t] = jnp.sum(g * w, axis=1)
      dc_ref[t] = jnp.sum(h * dy, axis=1)
      du_ref[row, :] = (dt * gb + d_row * dy).astype(du_ref.dtype)
      ddelta = tiles.delta_grad(ga + u * gb, delta, bias, use_softplus=spec.use_softplus)
      ddelta = jnp.where(t < spec.length, ddelta, 0.0)
      ddelta_ref[row, :] = ddelta.astype(ddelta_ref.dtype)
      return g_prev, da + da_t, dd + dy * u, dbias + ddelta

    carry = lax.fori_loop(0, spec.chunk, reverse, carry, unroll=spec.unroll)
    barrier()
    return carry

  zeros_row = jnp.zeros(d_row.shape, _f32)
  g, da, dd, dbias = lax.fori_loop(
      0, num_chunks, chunk_body,
      (dht_ref[...], jnp.zeros(a_mat.shape, _f32), zeros_row, zeros_row))
  dh0_ref[...] = g
  da_ref[...] = da
  dd_ref[...] = dd
  dbias_ref[...] = dbias


def backward(spec, u, delta, dy, a_t, b, c, d_skip, bias, starts, dht, *, interpret):
  """Gradients of the padded scan; arguments and results as `selective_scan_tpu.backward`."""
  bt, lp, dp = u.shape
  pp, nc, nd = a_t.shape[0], lp // spec.chunk, dp // spec.block_d
  s = _specs(spec, lp, pp, nc)
  f32_out = lambda shape: jax.ShapeDtypeStruct(shape, _f32)  # noqa: E731
  *grads, _ = pl.pallas_call(
      functools.partial(_bwd_kernel, spec=spec, num_chunks=nc, interpret=interpret),
      grid=(bt, nd),
      in_specs=[s["x"], s["x"], s["x"], s["a"], s["bc"], s["bc"], s["row"], s["row"],
                s["saved"], s["state"]],
      out_specs=[s["x"], s["x"], s["part"], s["part"], s["state"], s["acc"], s["acc"],
                 s["state"], s["work"]],
      out_shape=[jax.ShapeDtypeStruct(u.shape, u.dtype),
                 jax.ShapeDtypeStruct(delta.shape, delta.dtype),
                 f32_out((bt, nd, lp, pp)), f32_out((bt, nd, lp, pp)), f32_out((bt, pp, dp)),
                 f32_out((bt, 1, dp)), f32_out((bt, 1, dp)), f32_out((bt, pp, dp)),
                 f32_out((bt, nd, spec.chunk, pp, spec.block_d))],
      compiler_params=common.compiler_params(
          "gpu", dimension_semantics=("parallel", "parallel"), head_dim=spec.block_d),
      interpret=interpret,
      name="selective_scan_bwd",
  )(u, delta, dy, a_t, b, c, d_skip, bias, starts, dht)
  return grads
