"""S4 (Gu, Goel & Ré 2022, "Efficiently Modeling Long Sequences with Structured State Spaces"):
the HiPPO-LegS matrix, its normal-plus-low-rank (NPLR) form, and the convolution kernel of the
bilinear-discretised DPLR system by the Cauchy kernel with the Woodbury correction.

HiPPO-LegS (N states): A_nk = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k, 0 above;
B_n = sqrt(2n+1). With P_n = sqrt(n + 1/2), A + P P^T = -I/2 + (skew-symmetric) is normal:
A = V (Lambda - V*P (V*P)^*) V^*. Its eigenvalues come in conjugate pairs, so the system is kept
on N/2 of them (Im > 0) and outputs are 2 Re(C x).

In that basis, with A = diag(Lambda) - P Q^* (Q = P), step dt and the bilinear transform
dA = (I - dt/2 A)^-1 (I + dt/2 A), dB = (I - dt/2 A)^-1 dt B, the kernel's generating function
at the L-th roots of unity z is

  sum_{l<L} C dA^l dB z^l = 2 / (1 + z) * C~ (g(z) - A)^-1 B,   g(z) = 2/dt (1 - z) / (1 + z)

with C~ = C (I - dA^L) (z^L = 1 at the roots). The resolvent of a diagonal minus a rank-one
matrix is a Cauchy kernel plus the Woodbury correction:
  C~ (g - A)^-1 B = k_00 - k_01 (1 + k_11)^-1 k_10,   k_ij = sum_n u_i,n w_j,n / (g - lambda_n)
(u = (C~, Q^*), w = (B, P)), and K = 2 Re(iFFT) of it: O(N L) work, no powers of dA but one.
"""

import dataclasses

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from longjax.ops import diagonal_ssm
from longjax.ops import dispatch
from longjax.ops.masks import document_keep


def hippo_legs(n: int) -> tuple[np.ndarray, np.ndarray]:
  """(A [N, N], B [N]) of HiPPO-LegS, float64."""
  q = np.sqrt(2 * np.arange(n) + 1.0)
  a = -np.tril(q[:, None] * q[None, :], -1) - np.diag(np.arange(n) + 1.0)
  return a, q.copy()


def nplr_legs(n: int, half: bool = True):
  """HiPPO-LegS in the eigenbasis of its normal part: A = V (diag(Lambda) - P P^*) V^*.

  With `half`, one eigenvalue of each conjugate pair (Im > 0) and its columns of V: S4's
  parameterisation, N/2 complex states with outputs 2 Re(C x). (The rank-one term then acts
  within the half only: the kept system starts near LegS rather than equal to it, and trains
  from there, as in the reference implementation.)

  Returns:
    (Lambda [M], P [M], B [M], V [N, M]) complex128, M = N/2 with `half`, else N.
  """
  a, b = hippo_legs(n)
  p = np.sqrt(np.arange(n) + 0.5)
  normal = a + np.outer(p, p)
  # -I/2 + skew: eigenvalues -1/2 + i w. eigh on the Hermitian i * skew part is exact and
  # returns orthonormal eigenvectors, which a general eig does not guarantee for repeats.
  skew = normal + 0.5 * np.eye(n)
  w, v = np.linalg.eigh(-1j * skew)
  keep = np.argsort(w)[n // 2:] if half else np.arange(n)  # Im(Lambda) = w > 0: one per pair
  lam = -0.5 + 1j * w[keep]
  v = v[:, keep]
  return lam, v.conj().T @ p, v.conj().T @ b, v


def _bilinear_dense(lam, p, b, dt):
  """dA, dB of the DPLR system, dense [H, N, N] and [H, N].

  The inverse (I - dt/2 A)^-1 of A = Lambda - p p^H is the Sherman-Morrison formula on the
  diagonal D = I - dt/2 Lambda plus the rank-one dt/2 p p^H, not a batched LU: XLA's CPU runtime
  runs independent LAPACK calls (one per layer) on its thread pool, and each fans its batch out
  into that same pool and waits, which deadlocked a d512 4-layer S4 train step on 2 cores.
  """
  n = lam.shape[-1]
  a = jnp.einsum("hn,nm->hnm", lam, jnp.eye(n)) - p[..., :, None] * p.conj()[..., None, :]
  eye = jnp.eye(n, dtype=a.dtype)
  s = (dt / 2.0)[:, None]
  d_inv = 1.0 / (1.0 - s * lam)                                  # [H, N]
  left_u, right_u = d_inv * p, p.conj() * d_inv                  # D^-1 p, p^H D^-1
  denominator = 1.0 + s * jnp.sum(p.conj() * d_inv * p, axis=-1, keepdims=True)
  left = (jnp.einsum("hn,nm->hnm", d_inv, eye)
          - (s / denominator)[..., None] * left_u[..., :, None] * right_u[..., None, :])
  half = s[..., None] * a
  return left @ (eye + half), jnp.einsum("hnm,hm->hn", left, dt[:, None] * b)


def discrete_dense(lam, p, b, dt):
  """(dA [H, N, N], dB [H, N]) complex64 of the bilinear-discretised DPLR system per channel:
  the recurrence a decode step runs. lam, p, b [H, N] complex; dt [H]."""
  return _bilinear_dense(lam.astype(jnp.complex64), p.astype(jnp.complex64),
                         b.astype(jnp.complex64), dt.astype(jnp.complex64))


def cauchy_kernel(lam, p, b, c, dt, length: int) -> jax.Array:
  """K [H, L] float32, K_l = 2 Re(C dA^l dB), by Cauchy + Woodbury at the roots of unity.

  Args:
    lam, p, b, c: [H, N] complex (Lambda, the low-rank P = Q, B and C in the diagonal basis).
    dt: [H] steps.
    length: L.
  """
  lam, p, b, c = (x.astype(jnp.complex64) for x in (lam, p, b, c))
  dt = dt.astype(jnp.float32)
  # An odd number of roots: z = -1 (where 2 / (1 + z) divides by zero) is never one of them.
  m = length + 1 - length % 2
  da, _ = _bilinear_dense(lam, p, b, dt.astype(jnp.complex64))
  c_tilde = c - jnp.einsum("hn,hnm->hm", c, jnp.linalg.matrix_power(da, m))
  z = jnp.exp(-2j * jnp.pi * jnp.arange(m) / m)  # [M]
  g = (2.0 / dt)[:, None] * ((1.0 - z) / (1.0 + z))[None]  # [H, M]
  r = 1.0 / (g[:, :, None] - lam[:, None, :])  # [H, M, N]
  k = lambda u, w: jnp.einsum("hn,hmn->hm", u * w, r)  # noqa: E731
  k00, k01, k10, k11 = k(c_tilde, b), k(c_tilde, p), k(p.conj(), b), k(p.conj(), p)
  spectrum = 2.0 / (1.0 + z)[None] * (k00 - k01 * k10 / (1.0 + k11))
  return 2.0 * jnp.real(jnp.fft.ifft(spectrum, axis=-1))[:, :length]


@dataclasses.dataclass(frozen=True)
class DplrCall:
  length: int
  has_segments: bool
  has_state: bool


def _fft_unsupported(call: DplrCall, context: dispatch.Context) -> str | None:
  del context
  if call.has_segments:
    return "document resets (segment_ids) are not a convolution"
  if call.has_state:
    return "the Cauchy kernel starts from a zero state (a decode cache continues the recurrence)"
  return None


DPLR_SSM = dispatch.Op(
    name="S4 (DPLR) SSM",
    implementations=(dispatch.Implementation("fft", unsupported=_fft_unsupported),
                     dispatch.Implementation("recurrent")),
    preference={"cpu": ("fft", "recurrent")},
)
IMPLS = DPLR_SSM.choices


def dplr_ssm(u, lam, p, b, c, dt, d=None, *, segment_ids=None, initial_state=None,
             impl: str = "auto"):
  """y = 2 Re(C h) + D u of the bilinear-discretised DPLR system, per channel.

  Args:
    u: [B, T, H] inputs.
    lam, p, b, c: [H, N] complex (Lambda with Re < 0, the rank-one P = Q, B, C).
    dt: [H] steps.
    d: [H] skip weights, or None.
    segment_ids: [B, T] packed documents (the state restarts at each): the recurrence.
    initial_state: [B, H, N] complex64 (a decode cache's): the recurrence.
    impl: "auto", "fft" (Cauchy kernel + FFT convolution) or "recurrent" (dense [N, N] steps).

  Returns:
    (y [B, T, H] in u.dtype, final state [B, H, N] complex64, or None from the FFT form).
  """
  bsz, t, h = u.shape
  call = DplrCall(length=t, has_segments=segment_ids is not None,
                  has_state=initial_state is not None)
  name = dispatch.resolve(DPLR_SSM, impl, call).impl
  u32 = u.astype(jnp.float32)
  if name == "fft":
    y, final = diagonal_ssm.fft_conv(u32, cauchy_kernel(lam, p, b, c, dt, t)), None
  else:
    da, db = discrete_dense(lam, p, b, dt)
    c = c.astype(jnp.complex64)
    keep = document_keep(segment_ids, bsz, t)

    def step(state, xs):
      u_t, keep_t = xs  # [B, H], [B]
      state = (keep_t[:, None, None] * jnp.einsum("hnm,bhm->bhn", da, state)
               + db * u_t[..., None])
      return state, 2.0 * jnp.real(jnp.sum(c * state, axis=-1))

    h0 = (jnp.zeros((bsz, h, lam.shape[-1]), jnp.complex64) if initial_state is None
          else initial_state.astype(jnp.complex64))
    final, y = lax.scan(step, h0, (jnp.moveaxis(u32, 1, 0).astype(jnp.complex64),
                                   jnp.moveaxis(keep, 1, 0)))
    y = jnp.moveaxis(y, 0, 1)
  if d is not None:
    y = y + d.astype(jnp.float32) * u32
  return y.astype(u.dtype), final
