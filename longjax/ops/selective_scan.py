"""Mamba's selective scan with document resets: the maths of the `mamba` mixer.

Per batch row, inner channel e and state n, with m_t = 0 where a new document starts
(`segment_ids[t] != segment_ids[t-1]`, t > 0), else 1:

  dt_t = softplus(delta_t + delta_bias)                      [E]
  h_t  = m_t exp(dt_t A) h_{t-1} + (dt_t u_t) B_t             [E, N]   (A [E, N], B_t [N])
  y_t  = h_t C_t + D u_t                                     [E]

Implementations (`SELECTIVE_SCAN`, chosen by `longjax.ops.dispatch`):
  cpu        `kernels_cpu.selective_scan` (C++ via XLA FFI, vectorised over channels, its own
             backward); every option; channels per group a multiple of 16 and a C++ compiler.
             The CPU default: 15-21x the recurrence's speed (docs/kernels.md).
  recurrent  the plain recurrence: a `lax.scan` over time, in rematerialised blocks of `BLOCK`
             steps (the backward pass keeps one [E, N] state per block, not per step); every
             option. The fallback everywhere, and the benchmarks' `lax.scan` peer.
  pallas     `kernels_pallas.scan` (chunked in VMEM / SRAM; TPU and GPU); no document resets, so
             packed batches take the recurrence.

Shapes: u, delta [B, T, E]; A [E, N]; B, C [B, T, N] or [B, T, G, N] (channel e reads group
e // (E / G)); D, delta_bias [E]; segment_ids [B, T]; initial_state [B, E, N] float32.
Arithmetic is float32 inside; y has u's dtype, the final state is float32.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

import kernels_cpu
from kernels_pallas import scan as scan_kernel
from longjax.ops import dispatch
from longjax.ops.masks import document_keep

# Steps per rematerialised block of the recurrence.
BLOCK = 64


@dataclasses.dataclass(frozen=True)
class SelectiveScanCall:
  """What the dispatcher's checks read."""
  length: int
  has_segments: bool
  channels_per_group: int


def _cpu_unsupported(call: SelectiveScanCall, context: dispatch.Context) -> str | None:
  if context.backend != "cpu":
    return f"the backend is {context.backend!r}; the kernel runs on the CPU only"
  return kernels_cpu.selective_scan_unsupported(call.channels_per_group)


def _pallas_unsupported(call: SelectiveScanCall, context: dispatch.Context) -> str | None:
  del context
  return "document resets (segment_ids) are not in the kernel" if call.has_segments else None


def _pallas_passed_over(call: SelectiveScanCall, context: dispatch.Context) -> str | None:
  del call
  if context.backend == "cpu":
    return "Pallas runs interpreted on CPU (for tests), far slower than XLA"
  return None


SELECTIVE_SCAN = dispatch.Op(
    name="selective scan",
    implementations=(
        dispatch.Implementation("cpu", unsupported=_cpu_unsupported),
        dispatch.Implementation("recurrent"),
        dispatch.Implementation("pallas", unsupported=_pallas_unsupported,
                                passed_over=_pallas_passed_over),
    ),
    preference={"cpu": ("cpu", "recurrent"), "gpu": ("pallas", "recurrent"),
                "tpu": ("pallas", "recurrent")},
)
IMPLS = SELECTIVE_SCAN.choices


def _per_group(x, channels):
  """[B, T, N] or [B, T, G, N] -> [B, T, G, N] f32 and the channels per group."""
  x = x.astype(jnp.float32)
  if x.ndim == 3:
    x = x[:, :, None]
  return x, channels // x.shape[2]


def _recurrent(u, dt, a, b, c, keep, h0):
  """y [B, T, E] (without the D term) and the final state, by a blocked, rematerialised scan."""
  bsz, t, e = u.shape
  b, per = _per_group(b, e)
  c, _ = _per_group(c, e)
  pad = -t % BLOCK if t > BLOCK else 0
  block = BLOCK if t > BLOCK else t
  # Padded steps: dt = 0 (decay 1, no input) and no reset leave the state as it is.
  padded = lambda x, fill=0.0: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2),
                                       constant_values=fill)
  xs = (padded(u), padded(dt), padded(b), padded(c), padded(keep, 1.0))
  nb = (t + pad) // block
  to_blocks = lambda x: jnp.moveaxis(x.reshape(bsz, nb, block, *x.shape[2:]), (1, 2), (0, 1))

  def step(h, x):
    u_t, dt_t, b_t, c_t, keep_t = x  # [B, E], [B, E], [B, G, N], [B, G, N], [B]
    b_e, c_e = (jnp.repeat(y, per, axis=1) for y in (b_t, c_t))  # [B, E, N]
    decay = jnp.exp(dt_t[..., None] * a) * keep_t[:, None, None]
    h = decay * h + (dt_t * u_t)[..., None] * b_e
    return h, jnp.sum(h * c_e, axis=-1)

  @jax.checkpoint
  def run_block(h, x):
    return lax.scan(step, h, x)

  final, y = lax.scan(run_block, h0, tuple(to_blocks(x) for x in xs))
  y = jnp.moveaxis(y, (0, 1), (1, 2)).reshape(bsz, t + pad, e)[:, :t]
  return y, final


def _cpu_kernel(u, dt, a, b, c, keep, h0):
  e = u.shape[2]
  b, _ = _per_group(b, e)
  c, _ = _per_group(c, e)
  return kernels_cpu.selective_scan(u, dt, a, b, c, keep, h0)


def _check(u, delta, a, b, c, d_skip, delta_bias, segment_ids, initial_state):
  if u.ndim != 3 or delta.shape != u.shape:
    raise ValueError(f"u and delta must be [B, T, E], got {u.shape} and {delta.shape}")
  bsz, t, e = u.shape
  if a.ndim != 2 or a.shape[0] != e:
    raise ValueError(f"A must be [E={e}, N], got {a.shape}")
  n = a.shape[1]
  for name, x in (("B", b), ("C", c)):
    if x.shape[:2] != (bsz, t) or x.shape[-1] != n or x.ndim not in (3, 4):
      raise ValueError(f"{name} must be [B={bsz}, T={t}, N={n}] or [B, T, G, N], got {x.shape}")
  if b.ndim == 4 and e % b.shape[2]:
    raise ValueError(f"E={e} channels must split evenly into G={b.shape[2]} groups")
  for name, x in (("D", d_skip), ("delta_bias", delta_bias)):
    if x is not None and jnp.shape(x) != (e,):
      raise ValueError(f"{name} must be [E={e}], got {jnp.shape(x)}")
  if segment_ids is not None and jnp.shape(segment_ids) != (bsz, t):
    raise ValueError(f"segment_ids must be [B={bsz}, T={t}], got {jnp.shape(segment_ids)}")
  if initial_state is not None and jnp.shape(initial_state) != (bsz, e, n):
    raise ValueError(f"initial_state must be [B={bsz}, E={e}, N={n}], got "
                     f"{jnp.shape(initial_state)}")


def selective_scan(u, delta, a, b, c, d_skip=None, *, delta_bias=None, segment_ids=None,
                   initial_state=None, impl: str = "auto"):
  """Mamba's selective scan (the module docstring's recurrence), softplus step sizes.

  Args:
    u: [B, T, E] inputs.
    delta: [B, T, E] step-size pre-activations.
    a: [E, N] the diagonal state matrix (negative: a decay).
    b, c: [B, T, N] or [B, T, G, N] input and output projections of the state.
    d_skip: [E] skip weights, or None.
    delta_bias: [E] added to delta before the softplus, or None.
    segment_ids: [B, T] document ids of a packed batch (None: one document per row).
    initial_state: [B, E, N] the state before step 0 (a decode cache's); None = 0.
    impl: "auto" or one of `SELECTIVE_SCAN.names`.

  Returns:
    (y [B, T, E] in u.dtype, final state [B, E, N] float32).
  """
  _check(u, delta, a, b, c, d_skip, delta_bias, segment_ids, initial_state)
  bsz, t, e = u.shape
  groups = 1 if b.ndim == 3 else b.shape[2]
  call = SelectiveScanCall(length=t, has_segments=segment_ids is not None,
                           channels_per_group=e // groups)
  name = dispatch.resolve(SELECTIVE_SCAN, impl, call).impl
  h0 = (jnp.zeros((bsz, e, a.shape[1]), jnp.float32) if initial_state is None
        else jnp.asarray(initial_state, jnp.float32))
  if name == "pallas":
    return scan_kernel.selective_scan(u, delta, a, b, c, d_skip, delta_bias=delta_bias,
                                      initial_state=h0)
  dt = delta.astype(jnp.float32) + (0.0 if delta_bias is None else delta_bias)
  dt = jax.nn.softplus(dt)
  keep = document_keep(segment_ids, bsz, t)
  u32 = u.astype(jnp.float32)
  run = _recurrent if name == "recurrent" else _cpu_kernel
  y, final = run(u32, dt, a.astype(jnp.float32), b, c, keep, h0)
  if d_skip is not None:
    y = y + d_skip.astype(jnp.float32) * u32
  return y.astype(u.dtype), final
