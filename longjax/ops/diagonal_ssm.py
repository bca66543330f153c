"""Diagonal state space models (S4D: Gu, Gupta, Goel & Ré 2022, "On the Parameterization and
Initialization of Diagonal State Space Models"): discretisation, the Vandermonde kernel, the
FFT convolution that trains, the recurrence that decodes.

Per channel h (of H) the continuous system x'(t) = A x(t) + B u(t), y = 2 Re(C x) + D u with a
diagonal complex A [N] (N complex states standing for 2N real ones: conjugate pairs, hence the
2 Re), discretised with step dt_h:

  zoh       dA = exp(dt A),                    dB = (dA - 1) / A * B
  bilinear  dA = (1 + dt A / 2) / (1 - dt A / 2),  dB = dt / (1 - dt A / 2) * B

  h_t = dA h_{t-1} + dB u_t,   y_t = 2 Re(C h_t) + D u_t
  <=>  y = K * u + D u,  K_l = 2 Re(sum_n C_n dB_n dA_n^l)   (the Vandermonde kernel, [H, T])

Implementations (`DIAGONAL_SSM`, chosen by `longjax.ops.dispatch`):
  fft        the convolution by FFT (O(T log T)), the initial state's contribution and the final
             state as Vandermonde products; no document resets. The default.
  recurrent  the recurrence as a `lax.scan` over time (complex64 state); every option, the
             decode step and packed batches (document resets).

Shapes: u [B, T, H]; dt [H]; a, b, c [H, N] complex64; d [H]; segment_ids [B, T];
initial_state [B, H, N] complex64. y has u's dtype; the final state is complex64.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from longjax.ops import dispatch
from longjax.ops.masks import document_keep

DISCRETIZATIONS = ("zoh", "bilinear")


def discretize(dt: jax.Array, a: jax.Array, b: jax.Array, method: str):
  """(dA, dB), each [H, N] complex64, from the step dt [H] and A, B [H, N]."""
  dta = dt[:, None].astype(jnp.complex64) * a
  if method == "zoh":
    da = jnp.exp(dta)
    return da, (da - 1.0) / a * b
  if method == "bilinear":
    den = 1.0 - dta / 2.0
    return (1.0 + dta / 2.0) / den, dt[:, None] / den * b
  raise ValueError(f"method must be one of {DISCRETIZATIONS}, got {method!r}")


def _powers(da: jax.Array, exponents: jax.Array) -> jax.Array:
  """dA^l [H, N, L] as exp(l log dA): one exp per entry, no repeated products."""
  return jnp.exp(exponents.astype(jnp.float32) * jnp.log(da)[..., None])


def vandermonde_kernel(da: jax.Array, db: jax.Array, c: jax.Array, length: int) -> jax.Array:
  """K [H, L] float32, K_l = 2 Re(sum_n C_n dB_n dA_n^l)."""
  powers = _powers(da, jnp.arange(length))
  return 2.0 * jnp.real(jnp.einsum("hn,hnl->hl", c * db, powers))


def fft_conv(u: jax.Array, k: jax.Array) -> jax.Array:
  """Causal convolution y_t = sum_{s<=t} K_{t-s} u_s: u [B, T, H], k [H, T] -> [B, T, H]."""
  t = u.shape[1]
  n = 2 * t  # zero padding: no wrap-around
  spectrum = jnp.fft.rfft(u, n=n, axis=1) * jnp.fft.rfft(k.T, n=n, axis=0)[None]
  return jnp.fft.irfft(spectrum, n=n, axis=1)[:, :t]


def _fft(u, da, db, c, h0):
  t = u.shape[1]
  y = fft_conv(u, vandermonde_kernel(da, db, c, t))
  steps = jnp.arange(t)
  # The initial state decays into every output: 2 Re(sum_n C_n dA_n^{t+1} h0_n).
  y = y + 2.0 * jnp.real(jnp.einsum("hn,hnt,bhn->bth", c, _powers(da, steps + 1), h0))
  # Final state: dA^T h0 + sum_s dA^{T-1-s} dB u_s.
  to_end = _powers(da, t - 1 - steps)
  final = (_powers(da, jnp.asarray([t]))[..., 0] * h0
           + jnp.einsum("hns,hn,bsh->bhn", to_end, db, u.astype(jnp.complex64)))
  return y, final


def _recurrent(u, da, db, c, keep, h0):
  def step(h, xs):
    u_t, keep_t = xs  # [B, H], [B]
    h = keep_t[:, None, None] * da * h + db * u_t[..., None]
    return h, 2.0 * jnp.real(jnp.sum(c * h, axis=-1))

  final, y = lax.scan(step, h0, (jnp.moveaxis(u, 1, 0).astype(jnp.complex64),
                                 jnp.moveaxis(keep, 1, 0)))
  return jnp.moveaxis(y, 0, 1), final


@dataclasses.dataclass(frozen=True)
class DiagonalSSMCall:
  length: int
  has_segments: bool


def _fft_unsupported(call: DiagonalSSMCall, context: dispatch.Context) -> str | None:
  del context
  return "document resets (segment_ids) are not a convolution" if call.has_segments else None


def _fft_passed_over(call: DiagonalSSMCall, context: dispatch.Context) -> str | None:
  del context
  return "one step: the recurrence is cheaper than two FFTs" if call.length == 1 else None


DIAGONAL_SSM = dispatch.Op(
    name="diagonal SSM",
    implementations=(
        dispatch.Implementation("fft", unsupported=_fft_unsupported,
                                passed_over=_fft_passed_over),
        dispatch.Implementation("recurrent"),
    ),
    preference={"cpu": ("fft", "recurrent")},
)
IMPLS = DIAGONAL_SSM.choices


def diagonal_ssm(u, dt, a, b, c, d=None, *, method: str = "zoh", segment_ids=None,
                 initial_state=None, impl: str = "auto"):
  """y = 2 Re(C h) + D u of the discretised diagonal system (module docstring).

  Args:
    u: [B, T, H] inputs.
    dt: [H] positive steps.
    a: [H, N] complex, Re < 0 for a stable system; b, c: [H, N] complex.
    d: [H] skip weights, or None.
    method: "zoh" or "bilinear".
    segment_ids: [B, T] document ids of a packed batch; the state restarts at each.
    initial_state: [B, H, N] complex64 (a decode cache's); None = 0.
    impl: "auto" or one of `DIAGONAL_SSM.names`.

  Returns:
    (y [B, T, H] in u.dtype, final state [B, H, N] complex64).
  """
  bsz, t, h = u.shape
  if a.shape != b.shape or a.shape != c.shape or a.shape[0] != h or jnp.shape(dt) != (h,):
    raise ValueError(f"dt must be [H={h}] and A, B, C [H={h}, N], got {jnp.shape(dt)}, "
                     f"{a.shape}, {b.shape}, {c.shape}")
  if initial_state is not None and initial_state.shape != (bsz, h, a.shape[1]):
    raise ValueError(f"initial_state must be [B={bsz}, H={h}, N={a.shape[1]}], got "
                     f"{initial_state.shape}")
  call = DiagonalSSMCall(length=t, has_segments=segment_ids is not None)
  name = dispatch.resolve(DIAGONAL_SSM, impl, call).impl
  da, db = discretize(dt.astype(jnp.float32), a.astype(jnp.complex64), b.astype(jnp.complex64),
                      method)
  c = c.astype(jnp.complex64)
  h0 = (jnp.zeros((bsz, h, a.shape[1]), jnp.complex64) if initial_state is None
        else initial_state.astype(jnp.complex64))
  u32 = u.astype(jnp.float32)
  if name == "fft":
    y, final = _fft(u32, da, db, c, h0)
  else:
    y, final = _recurrent(u32, da, db, c, document_keep(segment_ids, bsz, t), h0)
  if d is not None:
    y = y + d.astype(jnp.float32) * u32
  return y.astype(u.dtype), final
