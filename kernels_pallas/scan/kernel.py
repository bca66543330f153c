"""Mamba-1 selective scan in Pallas: chunked forward and backward kernels, and a lax.scan reference.

For every batch row, channel d and state n (A diagonal, B and C shared by the channels of a group):

  dt_t = softplus(delta_t + delta_bias)        (or delta_t + delta_bias)
  h_t  = exp(dt_t A[d, n]) h_{t-1} + dt_t B_t[n] u_t
  y_t  = sum_n C_t[n] h_t[n] + D[d] u_t

The sequence is cut into chunks. The forward kernel runs the recurrence step by step on a
[P, block_d] state tile (channels on lanes, parallel over batch and channel blocks), carrying the
state from chunk to chunk, and saves only the state at each chunk start (O(L / chunk * D * P)).
The backward kernel (custom VJP) walks the chunks in reverse: it recomputes a chunk's states from
its saved start state, then runs the adjoint recurrence backwards through them, giving the
gradients of u, delta, A, B, C, D, delta_bias and the initial state, with the final state's
cotangent as the adjoint's starting value. Everything is computed in f32.

Two variants share the step maths (`selective_scan_tiles`): `selective_scan_tpu` (Mosaic: the
chunk axis is a sequential grid axis, states in VMEM scratch) and `selective_scan_gpu` (Triton:
the chunks are a loop in the body). `common.kernel_variant` picks one; both run in the
interpreter on CPU.

`selective_scan_reference` is the plain `lax.scan` recurrence, for tests.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import common
from kernels_pallas.scan import gpu as selective_scan_gpu
from kernels_pallas.scan import tiles as tiles
from kernels_pallas.scan import tpu as selective_scan_tpu

_VARIANTS = {"tpu": selective_scan_tpu, "gpu": selective_scan_gpu}
_f32 = jnp.float32


def _check_inputs(u, delta, a, b, c, d_skip, delta_bias, initial_state):
  if u.ndim != 3 or delta.shape != u.shape:
    raise ValueError(f"u and delta must be [Bt, L, D], got {u.shape} and {delta.shape}")
  bt, length, dm = u.shape
  if length < 1:
    raise ValueError("empty sequences are not supported")
  if a.ndim != 2 or a.shape[0] != dm:
    raise ValueError(f"A must be [D={dm}, P], got {a.shape}")
  p = a.shape[1]
  for name, x in (("B", b), ("C", c)):
    if x.shape[:2] != (bt, length) or x.shape[-1] != p or x.ndim not in (3, 4):
      raise ValueError(f"{name} must be [{bt}, {length}, P={p}] or [{bt}, {length}, G, {p}], "
                       f"got {x.shape}")
  if b.shape != c.shape:
    raise ValueError(f"B and C must have the same shape, got {b.shape} and {c.shape}")
  if b.ndim == 4 and dm % b.shape[2]:
    raise ValueError(f"D={dm} channels must split evenly into G={b.shape[2]} groups")
  for name, x in (("D", d_skip), ("delta_bias", delta_bias)):
    if x is not None and jnp.shape(x) != (dm,):
      raise ValueError(f"{name} must be [D={dm}], got {jnp.shape(x)}")
  if initial_state is not None and initial_state.shape != (bt, dm, p):
    raise ValueError(f"initial_state must be [{bt}, {dm}, {p}], got {initial_state.shape}")


def _blocks(variant, interpret, length, dm, groups, chunk, block_d, dtypes):
  """(chunk, block_d, padded D) for a call, defaults and hardware constraints included."""
  per_group = dm // groups
  if variant == "tpu":
    # Time is on sublanes: a multiple of 16 rows tiles both f32 (8) and packed 16-bit (16) data.
    # 128 steps keep the backward's [chunk, P, Dc] state scratch at 2 MiB for P=16, Dc=256.
    sublanes = 16 if any(jnp.dtype(x).itemsize < 4 for x in dtypes) else 8
    chunk = min(128, common.cdiv(length, 16) * 16) if chunk is None else chunk
    if block_d is None:
      lanes = common.cdiv(per_group, 128) * 128
      block_d = 256 if lanes % 256 == 0 and (groups == 1 or per_group % 256 == 0) else 128
    if not interpret and (chunk % sublanes or block_d % 128):
      raise ValueError(f"the TPU kernels need chunk % {sublanes} == 0 and block_d % 128 == 0 "
                       f"(vreg tiles), got chunk={chunk}, block_d={block_d}")
  else:
    # A Triton program holds a [P, block_d] state tile in registers; 32 channels keep many
    # programs in flight (Bt * D / 32) without spilling. 64 steps per chunk bound the
    # backward's per-program workspace to [64, P, 32] f32.
    chunk = min(64, length) if chunk is None else chunk
    if block_d is None:
      block_d = min(32, common.next_power_of_2(per_group))
      while groups > 1 and per_group % block_d:
        block_d //= 2
    if not interpret and block_d & (block_d - 1):
      raise ValueError(f"the GPU (Triton) kernels need a power-of-two block_d, got {block_d}")
  if chunk < 1 or block_d < 1:
    raise ValueError(f"chunk and block_d must be positive, got {chunk}, {block_d}")
  if groups > 1 and per_group % block_d:
    raise ValueError(f"block_d={block_d} must divide the {per_group} channels of each group")
  return chunk, block_d, common.cdiv(dm, block_d) * block_d


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _scan(spec, variant, interpret, u, delta, a_t, b, c, d_row, bias, h0):
  """Padded scan: u, delta [Bt, Lp, Dp]; A^T [P, Dp]; B, C [Bt, G, Lp, P]; D, bias [1, Dp];
  h0 [Bt, P, Dp] -> (y [Bt, Lp, Dp], h_T [Bt, P, Dp] f32)."""
  return _VARIANTS[variant].forward(spec, u, delta, a_t, b, c, d_row, bias, h0,
                                    save_states=False, interpret=interpret)


def _scan_fwd(spec, variant, interpret, u, delta, a_t, b, c, d_row, bias, h0):
  y, ht, starts = _VARIANTS[variant].forward(spec, u, delta, a_t, b, c, d_row, bias, h0,
                                             save_states=True, interpret=interpret)
  return (y, ht), (u, delta, a_t, b, c, d_row, bias, starts)


def _scan_bwd(spec, variant, interpret, residuals, cotangents):
  u, delta, a_t, b, c, d_row, bias, starts = residuals
  dy, dht = cotangents
  du, ddelta, db, dc, da, dd, dbias, dh0 = _VARIANTS[variant].backward(
      spec, u, delta, dy.astype(u.dtype), a_t, b, c, d_row, bias, starts, dht.astype(_f32),
      interpret=interpret)
  # dB, dC come per channel block; the blocks of a group are contiguous.
  bt, nd, lp, p = db.shape
  db, dc = (x.reshape(bt, spec.groups, nd // spec.groups, lp, p).sum(2) for x in (db, dc))
  return du, ddelta, da.sum(0), db, dc, dd.sum(0), dbias.sum(0), dh0


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan(u, delta, A, B, C, D=None, *, delta_bias=None, delta_softplus: bool = True,
                   initial_state=None, chunk_size: int | None = None,
                   block_d: int | None = None, return_final_state: bool = True,
                   interpret: bool | None = None, backend: str | None = None):
  """Mamba-1 selective scan (see the module docstring for the recurrence).

  Args:
    u: [Bt, L, D] inputs.
    delta: [Bt, L, D] step-size pre-activations.
    A: [D, P] real diagonal state matrix (negative for a stable scan).
    B: [Bt, L, P] input projections, or [Bt, L, G, P]: channel d reads group d // (D // G).
    C: like B, output projections.
    D: [D] skip weights, or None.
    delta_bias: [D] added to delta before the softplus, or None.
    delta_softplus: dt = softplus(delta + bias); False uses delta + bias as is.
    initial_state: [Bt, D, P] state before step 0; None means zeros.
    chunk_size: time steps per chunk (states are saved at chunk starts for the backward pass);
      None picks a per-backend default. L is padded to a multiple (padded steps have dt = 0).
    block_d: channels per kernel program; None picks a per-backend default.
    return_final_state: also return the state after the last step.
    interpret: run the Pallas interpreter; None means only on CPU.
    backend: kernel variant override, "tpu" or "gpu"; None picks by backend.

  Returns:
    y [Bt, L, D] in u.dtype; with `return_final_state`, (y, h_L [Bt, D, P] float32).
  """
  _check_inputs(u, delta, A, B, C, D, delta_bias, initial_state)
  bt, length, dm = u.shape
  p = A.shape[1]
  groups = B.shape[2] if B.ndim == 4 else 1
  variant = common.kernel_variant(backend)
  interpret = common.default_interpret() if interpret is None else bool(interpret)
  chunk, bd, dp = _blocks(variant, interpret, length, dm, groups, chunk_size, block_d,
                          (u.dtype, delta.dtype))
  # Triton tiles need power-of-two sizes; extra states have B = C = 0 and stay 0.
  pp = common.next_power_of_2(p) if variant == "gpu" else p

  def pad(x, axes_multiples):
    for axis, multiple in axes_multiples:
      x = common.pad_to_multiple(x, axis, multiple)
    return x

  def bc(x):  # [Bt, L, (G,) P] -> [Bt, G, Lp, Pp] f32
    x = x.reshape(bt, length, groups, p).transpose(0, 2, 1, 3).astype(_f32)
    return pad(x, ((2, chunk), (3, pp)))

  def row(x):
    return pad(jnp.zeros((1, dm), _f32) if x is None else x.astype(_f32)[None], ((1, dp),))

  h0 = jnp.zeros((bt, dm, p), _f32) if initial_state is None else initial_state.astype(_f32)
  spec = tiles.ScanSpec(length=length, chunk=chunk, block_d=bd, groups=groups,
                        blocks_per_group=dp // bd // groups, use_softplus=bool(delta_softplus),
                        # Triton's lowering cannot unroll; the interpreter would only compile
                        # longer. Mosaic gains from fewer loop-control scalar ops per step.
                        unroll=1 if interpret or variant == "gpu" else 8)
  y, ht = _scan(spec, variant, interpret, pad(u, ((1, chunk), (2, dp))),
                pad(delta, ((1, chunk), (2, dp))), pad(A.astype(_f32).T, ((0, pp), (1, dp))),
                bc(B), bc(C), row(D), row(delta_bias),
                pad(h0.transpose(0, 2, 1), ((1, pp), (2, dp))))
  y = y[:, :length, :dm]
  return (y, ht[:, :p, :dm].transpose(0, 2, 1)) if return_final_state else y


def selective_scan_reference(u, delta, A, B, C, D=None, *, delta_bias=None,
                             delta_softplus: bool = True, initial_state=None,
                             return_final_state: bool = True):
  """The recurrence as a plain `lax.scan` over time in f32 (arguments as `selective_scan`).

  Returns:
    y [Bt, L, D] in u.dtype; with `return_final_state`, (y, h_L [Bt, D, P] float32).
  """
  _check_inputs(u, delta, A, B, C, D, delta_bias, initial_state)
  bt, length, dm = u.shape
  p = A.shape[1]
  groups = B.shape[2] if B.ndim == 4 else 1
  dt = delta.astype(_f32) + (0.0 if delta_bias is None else delta_bias.astype(_f32))
  if delta_softplus:
    dt = jax.nn.softplus(dt)
  uf, a = u.astype(_f32), A.astype(_f32)

  def per_channel(x):  # [Bt, G, P] -> [Bt, D, P]
    return jnp.repeat(x.reshape(bt, groups, p).astype(_f32), dm // groups, axis=1)

  def step(h, xs):
    dt_t, u_t, b_t, c_t = xs
    h = jnp.exp(dt_t[..., None] * a) * h + (dt_t * u_t)[..., None] * per_channel(b_t)
    return h, jnp.sum(h * per_channel(c_t), axis=-1)

  h0 = jnp.zeros((bt, dm, p), _f32) if initial_state is None else initial_state.astype(_f32)
  time_major = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
  ht, ys = lax.scan(step, h0, tuple(map(time_major, (dt, uf, B, C))))
  y = time_major(ys)
  if D is not None:
    y = y + D.astype(_f32) * uf
  y = y.astype(u.dtype)
  return (y, ht) if return_final_state else y
