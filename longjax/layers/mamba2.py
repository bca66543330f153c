"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and Efficient Algorithms
Through Structured State Space Duality"): the mixer `mamba2`.

The block, with E = expand * D inner channels in N = E / P heads of P channels and G groups of
S-dimensional B and C shared by the heads of a group:

  z, xBC, dt = x W_in                          (E, E + 2 G S, N)
  x', B, C = silu(conv_K(xBC) + b)             depthwise causal convolution, K = 4 taps
  dt = softplus(dt + dt_bias),  A = -exp(A_log)                    per head
  h_t = exp(dt_t A) h_{t-1} + B_t^T (dt_t x'_t),   y_t = C_t h_t + D x'_t     h: [S, P] per head
  out = RMSNorm_G(y * silu(z)) W_out           RMS per group of heads, with a gain

The recurrence is state space duality's scalar-decay SSM: linear attention with q = C, k = B,
v = dt x' and a per-step, per-head decay exp(dt A) (`longjax.ops.linear_attention`, whose
quadratic masked form is SSD's "attention" form, its chunked form SSD's chunked algorithm and
the Pallas kernel its TPU/GPU path). Decoding carries an `SSMState`: the [N, S, P] state and the
convolution's last K-1 inputs, constant in the length. Packed documents reset both.

Initialisation as the reference implementation (`mamba_ssm`): A = U(1, 16) per head, dt_bias the
inverse softplus of dt ~ exp(U(log dt_min, log dt_max)) (floored at 1e-4), D = 1, the
convolution as PyTorch's Conv1d (U(+-1/sqrt(K))). Each longjax layer keeps its MLP after the
mixer (`model.mlp_hidden`), as Jamba-style hybrids do.

Config: `model.mamba2` (`defaults` below); `--config.model.mixers=mamba2`.
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
from longjax.layers import recurrent
from longjax.layers.mixer import MixerSpec
from longjax.ops import linear_attention as ops
from longjax.ops import short_conv
from longjax.ops import state_collapse
from longjax.ops.masks import document_keep

_DT_FLOOR = 1e-4


def uniform_init(low: float, high: float):
  return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, low, high)


def dt_bias_init(dt_min: float, dt_max: float):
  """softplus^-1(dt), dt log-uniform in [dt_min, dt_max]: softplus(dt_bias) starts at dt."""
  def init(key, shape, dtype):
    log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(dt_min), math.log(dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), _DT_FLOOR)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


class Mamba2(recurrent.RecurrentMixer):
  """The Mamba-2 block as a sequence mixer."""

  def __init__(self, width: int, *, state_dim: int = 64, head_dim: int = 64, expand: int = 2,
               groups: int = 1, conv_size: int = 4, dt_min: float = 1e-3, dt_max: float = 0.1,
               decay_scale: float = 1.0, state_window: int = 0, state_norm_max: float = 0.0,
               impl: str = "auto", chunk_size: int = 0,
               out_init_scale: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
    inner = expand * width
    num_heads = inner // head_dim
    self.conv_channels = inner + 2 * groups * state_dim
    self.w_in = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=1),
                             (width, inner + self.conv_channels + num_heads),
                             (params.EMBED, params.MLP))
    bound = conv_size ** -0.5
    self.conv_kernel = params.param(rngs, uniform_init(-bound, bound),
                                    (conv_size, self.conv_channels), (None, params.MLP))
    self.conv_bias = params.param(rngs, uniform_init(-bound, bound), (self.conv_channels,),
                                  (params.MLP,))
    self.dt_bias = params.param(rngs, dt_bias_init(dt_min, dt_max), (num_heads,),
                                (params.HEADS,))
    self.a_log = params.param(rngs, lambda k, s, d: jnp.log(uniform_init(1.0, 16.0)(k, s, d)),
                              (num_heads,), (params.HEADS,))
    self.d_skip = params.param(rngs, jax.nn.initializers.ones, (num_heads,), (params.HEADS,))
    self.norm_scale = params.param(rngs, jax.nn.initializers.ones, (inner,), (params.MLP,))
    self.w_out = params.param(rngs, params.fan_in_init(out_init_scale, in_axis=(0, 1), out_axis=2),
                              (num_heads, head_dim, width),
                              (params.HEADS, params.HEAD_DIM, params.EMBED))
    self.inner, self.groups, self.conv_size = inner, groups, conv_size
    self.num_heads, self.key_dim, self.value_dim = num_heads, state_dim, head_dim
    self.normalize = False
    # Multiplies A (the log decay dt A) at evaluation time: Stuffed Mamba's stronger forgetting.
    self.decay_scale = float(decay_scale)
    # Stuffed Mamba's other two mitigations (`longjax.ops.state_collapse`); 0 = off.
    self.state_window, self.state_norm_max = int(state_window), float(state_norm_max)
    self.impl = impl
    self.chunk_size = chunk_size or None
    self.dtype = dtype

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> caches.SSMState:
    """Zeros of the [B, N, S, P] state and the convolution history, whatever `max_length`."""
    del max_length
    linear = super().init_cache(batch_size, 0)
    history = short_conv.history_shape(batch_size, self.conv_size, self.conv_channels)
    window = None
    if self.state_window:  # the last w steps' (dt, B, dt x): O(w), constant in the length
      step = lambda *s: jax.ShapeDtypeStruct((batch_size, 1, self.num_heads, *s), jnp.float32)  # noqa: E731
      window = state_collapse.empty_history(
          self.state_window, step(), {"k": step(self.key_dim), "v": step(self.value_dim)})
    return caches.SSMState(state=linear.state, conv=jnp.zeros(history, dtype or self.dtype),
                           end=linear.end, window=window)

  def log_decay(self, dt: jax.Array) -> jax.Array:
    """log a_t = dt_t A per head: [B, T, N] float32 (< 0)."""
    return dt * -self.decay_scale * jnp.exp(self.a_log.value)

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: caches.SSMState | None = None):
    """Args: x [B, T, D]; positions [B, T] (unused: the recurrence orders the tokens);
    segment_ids [B, T] (packed documents: state and convolution restart at each); cache from
    `init_cache` or a previous call. Returns (y [B, T, D], the new cache or None)."""
    del positions
    b, t, _ = x.shape
    x = x.astype(self.dtype)
    zxbcdt = jnp.einsum("btd,de->bte", x, self.w_in.value.astype(self.dtype))
    z, xbc, dt = jnp.split(zxbcdt, [self.inner, self.inner + self.conv_channels], axis=-1)
    xbc, history = short_conv.causal_conv(xbc, self.conv_kernel.value, segment_ids=segment_ids,
                                          history=None if cache is None else cache.conv)
    xbc = jax.nn.silu(xbc.astype(jnp.float32) + self.conv_bias.value)
    xs, bc = jnp.split(xbc, [self.inner], axis=-1)
    xs = xs.reshape(b, t, self.num_heads, self.value_dim)
    # B and C [B, T, G, S], each group shared by N / G consecutive heads.
    b_in, c_out = (y.reshape(b, t, self.groups, self.key_dim) for y in jnp.split(bc, 2, axis=-1))
    per_group = self.num_heads // self.groups
    b_in, c_out = (jnp.repeat(y, per_group, axis=2) for y in (b_in, c_out))
    dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias.value)  # [B, T, N]
    if self.state_window or self.state_norm_max:
      y, cache = self._mitigated_scan(c_out, b_in, xs * dt[..., None], dt, segment_ids, cache)
    else:
      linear_cache = None if cache is None else caches.RecurrentState(cache.state, cache.end)
      y, linear_cache = self._attend(c_out, b_in, xs * dt[..., None], segment_ids=segment_ids,
                                     cache=linear_cache, log_decay=self.log_decay(dt))
      if cache is not None:
        cache = dataclasses.replace(cache, state=linear_cache.state, end=linear_cache.end)
    y = y.astype(jnp.float32) + self.d_skip.value[:, None] * xs
    gated = y.reshape(b, t, self.inner) * jax.nn.silu(z.astype(jnp.float32))
    # Normalised per group of heads (the reference's RMSNormGated, group size E / G).
    normed = recurrent.rms_normalize(gated.reshape(b, t, self.groups, -1)).reshape(b, t, -1)
    normed = normed * self.norm_scale.value
    if cache is not None:
      cache = dataclasses.replace(cache, conv=history)
    return self._project_out(normed.reshape(b, t, self.num_heads, self.value_dim)), cache

  def _mitigated_scan(self, q, k, v, dt, segment_ids, cache):
    """SSD's recurrence with `state_window` or `state_norm_max` (a `lax.scan` over time):
    (y [B, T, N, P], the cache with its state, window history and end advanced)."""
    caches.refuse_segments_with_cache(cache, segment_ids)
    a = (-self.decay_scale * jnp.exp(self.a_log.value))[:, None, None]
    y, state, window = state_collapse.decaying_scan(
        dt, a, lambda w: w["k"][..., None] * w["v"][..., None, :],
        lambda h, r: jnp.einsum("bns,bnsp->bnp", r["q"], h),
        {"k": k.astype(jnp.float32), "v": v.astype(jnp.float32)}, {"q": q.astype(jnp.float32)},
        keep=document_keep(segment_ids, *dt.shape[:2]),
        h0=None if cache is None else cache.state,
        history=None if cache is None else cache.window,
        window=self.state_window, norm_max=self.state_norm_max)
    if cache is not None:
      cache = dataclasses.replace(cache, state=state, window=window, end=cache.end + q.shape[1])
    return y, cache


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.state_dim = 64      # S, the state size per head (the paper: 64 to 256)
  c.head_dim = 64       # P, channels per head (the paper: 64)
  c.expand = 2          # E = expand * width inner channels
  c.groups = 1          # G groups of B and C (grouped like GQA's key/value heads)
  c.conv_size = 4       # K taps of the short convolution
  c.dt_min = 0.001      # the initial step sizes dt are log-uniform in [dt_min, dt_max]
  c.dt_max = 0.1
  c.decay_scale = 1.0   # multiplies A: > 1 forgets faster (a training-free state-collapse fix)
  c.state_window = 0    # > 0: the state of the last w steps only, exactly (cache: O(w))
  c.state_norm_max = 0.0  # > 0: each head's state scaled to at most this norm per step
  c.impl = "auto"       # auto | reference | recurrent | chunked | pallas
  c.chunk_size = 0      # chunked forms' C; 0 = the op's default (64)
  return c


def validate_selective(c, prefix: str, impls) -> None:
  """The fields Mamba and Mamba-2 share: conv_size, dt_min/dt_max, decay_scale, the state
  window and normalisation, impl."""
  if not isinstance(c.conv_size, int) or not 1 <= c.conv_size <= 16:
    raise ConfigError(f"{prefix}.conv_size", c.conv_size, "must be in 1..16 (a short convolution)")
  if not 0 < c.dt_min < c.dt_max:
    raise ConfigError(f"{prefix}.dt_min", c.dt_min,
                      f"must satisfy 0 < dt_min < dt_max (dt_max={c.dt_max})")
  if not isinstance(c.decay_scale, (int, float)) or not 0 < c.decay_scale <= 1e3:
    raise ConfigError(f"{prefix}.decay_scale", c.decay_scale, "must be in (0, 1000]")
  if not isinstance(c.state_window, int) or c.state_window < 0:
    raise ConfigError(f"{prefix}.state_window", c.state_window,
                      "must be an integer >= 0 (0 = off)")
  if not isinstance(c.state_norm_max, (int, float)) or c.state_norm_max < 0:
    raise ConfigError(f"{prefix}.state_norm_max", c.state_norm_max, "must be >= 0 (0 = off)")
  if c.state_window and c.state_norm_max:
    raise ConfigError(f"{prefix}.state_norm_max", c.state_norm_max,
                      f"cannot be combined with {prefix}.state_window={c.state_window} (the "
                      "window's subtraction is exact only for the plain recurrence)")
  if c.impl not in impls:
    raise ConfigError(f"{prefix}.impl", c.impl, "unknown choice", impls)


def validate(model, c, prefix: str = "model.mamba2") -> None:
  """Raises ConfigError for the first bad field of the section `c` of `model`."""
  for field in ("state_dim", "head_dim", "expand", "groups"):
    if not isinstance(c[field], int) or c[field] < 1:
      raise ConfigError(f"{prefix}.{field}", c[field], "must be an integer >= 1")
  inner = c.expand * model.width
  if inner % c.head_dim:
    raise ConfigError(f"{prefix}.head_dim", c.head_dim,
                      f"must divide the inner width expand * width = {inner}")
  if (inner // c.head_dim) % c.groups:
    raise ConfigError(f"{prefix}.groups", c.groups,
                      f"must divide the {inner // c.head_dim} heads (inner width / head_dim)")
  validate_selective(c, prefix, ops.IMPLS)
  if c.chunk_size < 0:
    raise ConfigError(f"{prefix}.chunk_size", c.chunk_size, "must be >= 0 (0 = the default)")


def build(model, c, rngs) -> Mamba2:
  return Mamba2(model.width, state_dim=c.state_dim, head_dim=c.head_dim, expand=c.expand,
                groups=c.groups, conv_size=c.conv_size, dt_min=c.dt_min, dt_max=c.dt_max,
                decay_scale=c.decay_scale, state_window=c.state_window,
                state_norm_max=c.state_norm_max, impl=c.impl, chunk_size=c.chunk_size,
                out_init_scale=dims.out_init_scale(model),
                dtype=dims.DTYPES[model.dtype], rngs=rngs)


SPEC = MixerSpec(name="mamba2", aliases=("mamba-2", "ssd"), section="mamba2", defaults=defaults,
                 validate=validate, build=build, cache_types=(caches.SSMState,))
