"""Mamba's selective scan on the CPU (C++ via XLA FFI), forward and backward.

`selective_scan(u, dt, a, b, c, keep, h0)` computes, per batch row, channel e and state n,
  h_t = keep_t exp(dt_t A[e, n]) h_{t-1} + dt_t u_t B_t[n],      y_t = sum_n h_t[n] C_t[n]
in float32, and returns (y, final state). Its gradients come from the backward kernel, which
keeps one state per 64 steps and recomputes the rest (memory O(T / 64) per channel block).
`selective_scan.h` has the algorithm; `build.py` compiles it on first use. Exponents dt A must
be at most 0 (dt > 0, A < 0, as in Mamba): the kernel's exp is accurate there.
"""

import jax
import jax.numpy as jnp

from kernels_cpu import build

CHANNEL_MULTIPLE = 16  # channels per group: a multiple of every build's vector lanes (8 or 16)


def unsupported(channels_per_group: int) -> str | None:
  """Why the kernel cannot serve this shape (or the machine), or None if it can."""
  if channels_per_group % CHANNEL_MULTIPLE:
    return f"channels per group ({channels_per_group}) not a multiple of {CHANNEL_MULTIPLE}"
  return build.unavailable_reason()


def _block(channels_per_group: int) -> int:
  """Channels per task: tasks own disjoint channels, and blocks stay within one group."""
  return next(b for b in (64, 32, 16) if channels_per_group % b == 0)


def _forward_call(u, dt, a, b, c, keep, h0):
  bsz, t, e = u.shape
  return jax.ffi.ffi_call(
      "LongjaxSelectiveScanForward",
      (jax.ShapeDtypeStruct((bsz, t, e), jnp.float32),
       jax.ShapeDtypeStruct(h0.shape, jnp.float32)),
      vmap_method="sequential",
  )(u, dt, a.T, b, c, keep, h0, block=_block(e // b.shape[2]))


@jax.custom_vjp
def selective_scan(u, dt, a, b, c, keep, h0):
  """The recurrence above.

  Args:
    u, dt: [B, T, E] float32 inputs and step sizes (after the softplus; positive).
    a: [E, N] float32 state matrix (negative).
    b, c: [B, T, G, N] float32; channel e reads group e // (E / G); E / G a multiple of 16.
    keep: [B, T] float32, 0 where a document starts (the state resets), else 1.
    h0: [B, E, N] float32 initial state.

  Returns:
    (y [B, T, E], final state [B, E, N]), float32.
  """
  build.ensure_loaded()
  return _forward_call(u, dt, a, b, c, keep, h0)


def _fwd(u, dt, a, b, c, keep, h0):
  build.ensure_loaded()
  return _forward_call(u, dt, a, b, c, keep, h0), (u, dt, a, b, c, keep, h0)


def _bwd(residuals, cotangents):
  u, dt, a, b, c, keep, h0 = residuals
  dy, dfinal = cotangents
  bsz, t, e = u.shape
  g, n = b.shape[2], b.shape[3]
  block = _block(e // g)
  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  du, ddt, da, db, dc, dh0 = jax.ffi.ffi_call(
      "LongjaxSelectiveScanBackward",
      (shape(bsz, t, e), shape(bsz, t, e), shape(bsz, n, e), shape(bsz, t, e // block, n),
       shape(bsz, t, e // block, n), shape(bsz, e, n)),
      vmap_method="sequential",
  )(u, dt, a.T, b, c, keep, h0, dy.astype(jnp.float32), dfinal.astype(jnp.float32),
    block=block)
  per_group = lambda x: jnp.sum(x.reshape(bsz, t, g, e // g // block, n), axis=3)
  return (du, ddt, jnp.sum(da, axis=0).T, per_group(db), per_group(dc), jnp.zeros_like(keep),
          dh0)


selective_scan.defvjp(_fwd, _bwd)
