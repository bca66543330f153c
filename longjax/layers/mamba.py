"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"): the
mixer `mamba`, the Mamba-1 block.

With E = expand * D inner channels, N states per channel and R = ceil(D / 16) the step-size rank:

  x, z = x W_in                                 (E, E)
  x' = silu(conv_K(x) + b)                      depthwise causal convolution, K = 4 taps
  dt_low, B, C = x' W_x                         (R, N, N): input-dependent B_t, C_t and step size
  dt = softplus(dt_low W_dt + dt_bias)          [E]
  h_t = exp(dt_t A) h_{t-1} + (dt_t x'_t) B_t,   y_t = h_t C_t + D x'_t     A = -exp(A_log) [E, N]
  out = (y * silu(z)) W_out

The scan is `longjax.ops.selective_scan` (a rematerialised `lax.scan` on CPU, the Pallas kernel
`kernels_pallas/scan` on TPU/GPU). Decoding carries an `SSMState`: the [E, N] state and the
convolution's last K-1 inputs, constant in the length. Packed documents reset both.

Initialisation as the reference implementation (`mamba_ssm`): A_log = log(1..N) per channel
(S4D-real), D = 1, dt_bias the inverse softplus of dt ~ exp(U(log dt_min, log dt_max)) (floored
at 1e-4), W_dt ~ U(+-R^-1/2), the convolution as PyTorch's Conv1d. Each longjax layer keeps its
MLP after the mixer (`model.mlp_hidden`), as Jamba-style hybrids do.

Config: `model.mamba` (`defaults` below); `--config.model.mixers=mamba`.
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
from longjax.layers.mamba2 import dt_bias_init
from longjax.layers.mamba2 import uniform_init
from longjax.layers.mamba2 import validate_selective
from longjax.layers.mixer import MixerSpec
from longjax.ops import selective_scan as ops
from longjax.ops import short_conv
from longjax.ops import state_collapse
from longjax.ops.masks import document_keep


def dt_rank(width: int) -> int:
  """R = ceil(D / 16), the reference's default rank of the step-size projection."""
  return math.ceil(width / 16)


class Mamba(nnx.Module):
  """The Mamba-1 block as a sequence mixer."""

  def __init__(self, width: int, *, state_dim: int = 16, expand: int = 2, conv_size: int = 4,
               dt_min: float = 1e-3, dt_max: float = 0.1, decay_scale: float = 1.0,
               state_window: int = 0, state_norm_max: float = 0.0, impl: str = "auto",
               out_init_scale: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
    inner, rank = expand * width, dt_rank(width)
    self.w_in = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2)),
                             (width, 2, inner), (params.EMBED, None, params.MLP))
    bound = conv_size ** -0.5
    self.conv_kernel = params.param(rngs, uniform_init(-bound, bound), (conv_size, inner),
                                    (None, params.MLP))
    self.conv_bias = params.param(rngs, uniform_init(-bound, bound), (inner,), (params.MLP,))
    self.w_x = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=1),
                            (inner, rank + 2 * state_dim), (params.MLP, None))
    self.w_dt = params.param(rngs, uniform_init(-rank ** -0.5, rank ** -0.5), (rank, inner),
                             (None, params.MLP))
    self.dt_bias = params.param(rngs, dt_bias_init(dt_min, dt_max), (inner,), (params.MLP,))
    self.a_log = params.param(
        rngs, lambda k, s, d: jnp.broadcast_to(jnp.log(jnp.arange(1, s[1] + 1, dtype=d)), s),
        (inner, state_dim), (params.MLP, None))
    self.d_skip = params.param(rngs, jax.nn.initializers.ones, (inner,), (params.MLP,))
    self.w_out = params.param(rngs, params.fan_in_init(out_init_scale, in_axis=0, out_axis=1),
                              (inner, width), (params.MLP, params.EMBED))
    self.inner, self.rank, self.state_dim, self.conv_size = inner, rank, state_dim, conv_size
    # Multiplies A (the log decay dt A) at evaluation time: Stuffed Mamba's stronger forgetting.
    self.decay_scale = float(decay_scale)
    # Stuffed Mamba's other two mitigations (`longjax.ops.state_collapse`); 0 = off.
    self.state_window, self.state_norm_max = int(state_window), float(state_norm_max)
    self.impl = impl
    self.dtype = dtype

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> caches.SSMState:
    """Zeros of the [B, E, N] state and the convolution history, whatever `max_length`."""
    del max_length
    history = short_conv.history_shape(batch_size, self.conv_size, self.inner)
    window = None
    if self.state_window:  # the last w steps' (u, dt, B): O(w), constant in the length
      per_step = jax.ShapeDtypeStruct((batch_size, 1, self.inner), jnp.float32)
      window = state_collapse.empty_history(self.state_window, per_step, {
          "u": per_step, "dt": per_step,
          "b": jax.ShapeDtypeStruct((batch_size, 1, self.state_dim), jnp.float32)})
    return caches.SSMState(state=jnp.zeros((batch_size, self.inner, self.state_dim), jnp.float32),
                           conv=jnp.zeros(history, dtype or self.dtype),
                           end=jnp.zeros((), jnp.int32), window=window)

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: caches.SSMState | None = None):
    """Args: x [B, T, D]; positions [B, T] (unused: the scan orders the tokens); segment_ids
    [B, T] (packed documents: state and convolution restart at each); cache from `init_cache` or
    a previous call. Returns (y [B, T, D], the new cache or None)."""
    del positions
    caches.refuse_segments_with_cache(cache, segment_ids)
    x = x.astype(self.dtype)
    xz = jnp.einsum("btd,dce->btce", x, self.w_in.value.astype(self.dtype))
    xs, history = short_conv.causal_conv(xz[:, :, 0], self.conv_kernel.value,
                                         segment_ids=segment_ids,
                                         history=None if cache is None else cache.conv)
    xs = jax.nn.silu(xs.astype(jnp.float32) + self.conv_bias.value).astype(self.dtype)
    proj = jnp.einsum("bte,ef->btf", xs, self.w_x.value.astype(self.dtype))
    dt_low, b_in, c_out = jnp.split(proj, [self.rank, self.rank + self.state_dim], axis=-1)
    delta = jnp.einsum("btr,re->bte", dt_low, self.w_dt.value.astype(self.dtype))
    a = -self.decay_scale * jnp.exp(self.a_log.value)
    initial_state = None if cache is None else cache.state
    window = None
    if self.state_window or self.state_norm_max:
      y, state, window = self._mitigated_scan(xs, delta, a, b_in, c_out, segment_ids, cache)
    else:
      y, state = ops.selective_scan(
          xs, delta, a, b_in, c_out, self.d_skip.value, delta_bias=self.dt_bias.value,
          segment_ids=segment_ids, initial_state=initial_state, impl=self.impl)
    gated = y.astype(jnp.float32) * jax.nn.silu(xz[:, :, 1].astype(jnp.float32))
    out = jnp.einsum("bte,ed->btd", gated.astype(self.dtype), self.w_out.value.astype(self.dtype))
    if cache is not None:
      cache = dataclasses.replace(cache, state=state, conv=history, end=cache.end + x.shape[1],
                                  window=window)
    return out, cache

  def _mitigated_scan(self, xs, delta, a, b_in, c_out, segment_ids, cache):
    """The selective scan with `state_window` or `state_norm_max` (a `lax.scan` over time):
    (y [B, T, E], the final state, the window's history or None)."""
    u = xs.astype(jnp.float32)
    dt = jax.nn.softplus(delta.astype(jnp.float32) + self.dt_bias.value)
    y, state, window = state_collapse.decaying_scan(
        dt, a, lambda w: (w["dt"] * w["u"])[..., None] * w["b"][:, None, :],
        lambda h, r: jnp.sum(h * r["c"][:, None, :], axis=-1),
        {"u": u, "dt": dt, "b": b_in.astype(jnp.float32)}, {"c": c_out.astype(jnp.float32)},
        keep=document_keep(segment_ids, *u.shape[:2]),
        h0=None if cache is None else cache.state,
        history=None if cache is None else cache.window,
        window=self.state_window, norm_max=self.state_norm_max)
    return (y + self.d_skip.value * u).astype(xs.dtype), state, window


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.state_dim = 16      # N states per inner channel (the paper: 16)
  c.expand = 2          # E = expand * width inner channels
  c.conv_size = 4       # K taps of the short convolution
  c.dt_min = 0.001      # the initial step sizes dt are log-uniform in [dt_min, dt_max]
  c.dt_max = 0.1
  c.decay_scale = 1.0   # multiplies A: > 1 forgets faster (a training-free state-collapse fix)
  c.state_window = 0    # > 0: the state of the last w steps only, exactly (cache: O(w))
  c.state_norm_max = 0.0  # > 0: each channel's state scaled to at most this norm per step
  c.impl = "auto"       # auto | cpu | recurrent | pallas
  return c


def validate(model, c, prefix: str = "model.mamba") -> None:
  """Raises ConfigError for the first bad field of the section `c` of `model`."""
  del model
  for field in ("state_dim", "expand"):
    if not isinstance(c[field], int) or c[field] < 1:
      raise ConfigError(f"{prefix}.{field}", c[field], "must be an integer >= 1")
  validate_selective(c, prefix, ops.IMPLS)


def build(model, c, rngs) -> Mamba:
  return Mamba(model.width, state_dim=c.state_dim, expand=c.expand, conv_size=c.conv_size,
               dt_min=c.dt_min, dt_max=c.dt_max, decay_scale=c.decay_scale,
               state_window=c.state_window, state_norm_max=c.state_norm_max, impl=c.impl,
               out_init_scale=dims.out_init_scale(model), dtype=dims.DTYPES[model.dtype],
               rngs=rngs)


SPEC = MixerSpec(name="mamba", aliases=("mamba1",), section="mamba", defaults=defaults,
                 validate=validate, build=build, cache_types=(caches.SSMState,))
