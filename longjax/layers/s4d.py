"""S4D in a gated H3-style block: the mixer `s4d`.

The SSM is S4D (Gu, Gupta, Goel & Ré 2022, "On the Parameterization and Initialization of
Diagonal State Space Models"): per channel a diagonal complex A of N/2 conjugate-pair states,
discretised by zero-order hold or the bilinear transform (`longjax.ops.diagonal_ssm`). A plain
SSM layer does not train as a language model by itself; H3 (Fu, Dao, Saab, Thomas, Rudra & Ré
2023, "Hungry Hungry Hippos") makes it one with multiplicative gates:

  q, k, v = x W_q, x W_k, x W_v               [E] each, E = width
  k' = shift_K(k)                             H3's shift SSM: a learned causal FIR of K taps
  y = q * S4D(k' * v)                         the diagonal SSM over the token-wise products
  out = y W_o

(H3 with one channel per head, dh = 1.) Training runs the SSM as an FFT convolution with its
Vandermonde kernel; decoding the recurrence from an `SSMState` (the [E, N/2] complex state and
the shift filter's last K-1 inputs), constant in the length. Packed documents reset both (the
SSM then runs as its recurrence: resets are not a convolution).

Initialisation (S4D's): A_n = -1/2 + i pi n (S4D-Lin) or -1/2 + i (N/pi)(N/(2n+1) - 1)
(S4D-Inv), B = 1, C ~ CN(0, 1), dt log-uniform in [dt_min, dt_max], D ~ N(0, 1).

Config: `model.s4d` (`defaults` below); `--config.model.mixers=s4d`.
"""

import dataclasses
import math

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from longjax.errors import ConfigError
from longjax.layers import caches
from longjax.layers import dims
from longjax.layers import params
from longjax.layers.mixer import MixerSpec
from longjax.ops import diagonal_ssm as ops
from longjax.ops import short_conv

INITS = ("lin", "inv")


def initial_a(init: str, states: int) -> tuple[jax.Array, jax.Array]:
  """(Re A, Im A) [N/2] of S4D-Lin or S4D-Inv for N real states (N/2 complex)."""
  n = jnp.arange(states // 2, dtype=jnp.float32)
  real = jnp.full_like(n, -0.5)
  if init == "lin":
    return real, math.pi * n
  return real, states / math.pi * (states / (2 * n + 1) - 1)


class S4D(nnx.Module):
  """H3's gated block around an S4D layer."""

  def __init__(self, width: int, *, state_dim: int = 64, init: str = "lin",
               discretization: str = "zoh", shift_size: int = 4, dt_min: float = 1e-3,
               dt_max: float = 0.1, impl: str = "auto", out_init_scale: float = 1.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    half = state_dim // 2
    self.w_qkv = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2)),
                              (width, 3, width), (params.EMBED, None, params.MLP))
    self.shift_kernel = params.param(rngs, params.normal(shift_size ** -0.5),
                                     (shift_size, width), (None, params.MLP))
    self._init_ssm(width, state_dim, init, rngs)
    self.c = params.param(rngs, params.normal(0.5 ** 0.5), (width, half, 2),
                          (params.MLP, None, None))
    self.log_dt = params.param(
        rngs, lambda k, s, d: jax.random.uniform(k, s, d, math.log(dt_min), math.log(dt_max)),
        (width,), (params.MLP,))
    self.d_skip = params.param(rngs, params.normal(1.0), (width,), (params.MLP,))
    self.w_out = params.param(rngs, params.fan_in_init(out_init_scale, in_axis=0, out_axis=1),
                              (width, width), (params.MLP, params.EMBED))
    self.width, self.half, self.shift_size = width, half, shift_size
    self.discretization = discretization
    self.impl = impl
    self.dtype = dtype

  def _init_ssm(self, width: int, state_dim: int, init: str, rngs: nnx.Rngs) -> None:
    """A (its log real part and imaginary part) and B, each [E, N/2] (B as real pairs)."""
    half = state_dim // 2
    real, imag = initial_a(init, state_dim)
    # -exp(a_real_log) keeps Re A < 0 (a stable system) whatever the optimiser does.
    self.a_real_log = params.param(rngs, lambda k, s, d: jnp.broadcast_to(jnp.log(-real), s),
                                   (width, half), (params.MLP, None))
    self.a_imag = params.param(rngs, lambda k, s, d: jnp.broadcast_to(imag, s), (width, half),
                               (params.MLP, None))
    self.b = params.param(rngs, lambda k, s, d: jnp.zeros(s, d).at[..., 0].set(1.0),
                          (width, half, 2), (params.MLP, None, None))

  def _run_ssm(self, u, segment_ids, initial_state):
    """The SSM over u [B, T, E]: (y [B, T, E], final state)."""
    dt, a, b, c = self.ssm_parameters()
    return ops.diagonal_ssm(u, dt, a, b, c, self.d_skip.value, method=self.discretization,
                            segment_ids=segment_ids, initial_state=initial_state, impl=self.impl)

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> caches.SSMState:
    """Zeros of the [B, E, N/2] complex state and the shift filter's history."""
    del max_length
    history = short_conv.history_shape(batch_size, self.shift_size, self.width)
    return caches.SSMState(state=jnp.zeros((batch_size, self.width, self.half), jnp.complex64),
                           conv=jnp.zeros(history, dtype or self.dtype),
                           end=jnp.zeros((), jnp.int32))

  def ssm_parameters(self):
    """(dt [E], A, B, C [E, N/2] complex64) of the continuous system."""
    a = -jnp.exp(self.a_real_log.value) + 1j * self.a_imag.value
    b, c = (jax.lax.complex(p.value[..., 0], p.value[..., 1]) for p in (self.b, self.c))
    return jnp.exp(self.log_dt.value), a, b, c

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: caches.SSMState | None = None):
    """Args: x [B, T, D]; positions [B, T] (unused: the SSM orders the tokens); segment_ids
    [B, T] (packed documents: state and shift filter restart at each); cache from `init_cache`
    or a previous call. Returns (y [B, T, D], the new cache or None)."""
    del positions
    caches.refuse_segments_with_cache(cache, segment_ids)
    x = x.astype(self.dtype)
    qkv = jnp.einsum("btd,dce->btce", x, self.w_qkv.value.astype(self.dtype))
    k, history = short_conv.causal_conv(qkv[:, :, 1], self.shift_kernel.value,
                                        segment_ids=segment_ids,
                                        history=None if cache is None else cache.conv)
    y, state = self._run_ssm(k.astype(jnp.float32) * qkv[:, :, 2].astype(jnp.float32),
                             segment_ids, None if cache is None else cache.state)
    out = (qkv[:, :, 0].astype(jnp.float32) * y).astype(self.dtype)
    out = jnp.einsum("bte,ed->btd", out, self.w_out.value.astype(self.dtype))
    if cache is not None:
      cache = dataclasses.replace(cache, state=state, conv=history, end=cache.end + x.shape[1])
    return out, cache


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.state_dim = 64            # N real states per channel (N/2 complex conjugate pairs)
  c.init = "lin"              # lin (S4D-Lin) | inv (S4D-Inv)
  c.discretization = "zoh"    # zoh | bilinear
  c.shift_size = 4            # K taps of H3's shift filter on the keys
  c.dt_min = 0.001            # dt is log-uniform in [dt_min, dt_max] at init
  c.dt_max = 0.1
  c.impl = "auto"             # auto | fft | recurrent
  return c


def validate_h3(c, prefix: str, impls) -> None:
  """The fields S4 and S4D share: state_dim, shift_size, dt_min/dt_max, impl."""
  if not isinstance(c.state_dim, int) or c.state_dim < 2 or c.state_dim % 2:
    raise ConfigError(f"{prefix}.state_dim", c.state_dim,
                      "must be an even integer >= 2 (conjugate pairs of complex states)")
  if not isinstance(c.shift_size, int) or not 1 <= c.shift_size <= 64:
    raise ConfigError(f"{prefix}.shift_size", c.shift_size, "must be in 1..64")
  if not 0 < c.dt_min < c.dt_max:
    raise ConfigError(f"{prefix}.dt_min", c.dt_min,
                      f"must satisfy 0 < dt_min < dt_max (dt_max={c.dt_max})")
  if c.impl not in impls:
    raise ConfigError(f"{prefix}.impl", c.impl, "unknown choice", impls)


def validate(model, c, prefix: str = "model.s4d") -> None:
  """Raises ConfigError for the first bad field of the section `c` of `model`."""
  del model
  validate_h3(c, prefix, ops.IMPLS)
  if c.init not in INITS:
    raise ConfigError(f"{prefix}.init", c.init, "unknown choice", INITS)
  if c.discretization not in ops.DISCRETIZATIONS:
    raise ConfigError(f"{prefix}.discretization", c.discretization, "unknown choice",
                      ops.DISCRETIZATIONS)


def build(model, c, rngs) -> S4D:
  return S4D(model.width, state_dim=c.state_dim, init=c.init, discretization=c.discretization,
             shift_size=c.shift_size, dt_min=c.dt_min, dt_max=c.dt_max, impl=c.impl,
             out_init_scale=dims.out_init_scale(model), dtype=dims.DTYPES[model.dtype],
             rngs=rngs)


SPEC = MixerSpec(name="s4d", aliases=("h3",), section="s4d", defaults=defaults,
                 validate=validate, build=build, cache_types=(caches.SSMState,))
