"""Multi-scale retention (Sun et al. 2023, "Retentive Network: A Successor to Transformer for
Large Language Models"): the mixer `retnet`.

Per head h a fixed decay gamma_h = 1 - 2^(-5-h) (heads see from ~32 to thousands of tokens):

  q = rot(x W_q),  k = rot(x W_k) / sqrt(H),  v = x W_v        (v heads are value_factor * H wide)
  S_t = gamma_h S_{t-1} + k_t^T v_t,   o_t = q_t S_t
  y = (swish(x W_g) * GroupNorm_h(o)) W_o

rot is RetNet's relative position, e^{i n theta} on queries and e^{-i m theta} on keys: the rotary
rotation (`longjax.posenc.rope`). GroupNorm_h normalises each head's output by its RMS without a
gain (as in torchscale's reference), which also makes the parallel form's row scaling irrelevant.
The parallel, chunked and recurrent forms are `longjax.ops.linear_attention` with
`log_decay = log gamma`; training runs the chunked form, decoding the recurrence from a
[N, H, value_factor * H] state.

Config: `model.retnet` (`defaults` below); `--config.model.mixers=retnet`.
"""

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
from longjax.posenc import rope


def retention_log_decay(num_heads: int) -> jax.Array:
  """log gamma_h = log(1 - 2^(-5-h)), h = 0..N-1: [N] float32."""
  return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32))))


class Retention(recurrent.RecurrentMixer):
  """Multi-scale retention with the swish gate and per-head normalisation."""

  def __init__(self, width: int, num_heads: int, head_dim: int, *, value_factor: int = 2,
               rope_theta: float = 10_000.0, impl: str = "auto", chunk_size: int = 0,
               out_init_scale: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
    value_dim = value_factor * head_dim
    self.w_qk = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2, 3)),
                             (width, 2, num_heads, head_dim),
                             (params.EMBED, None, params.HEADS, params.HEAD_DIM))
    # Values and the gate share one [D, 2, N, Hv] matrix.
    self.w_vg = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2, 3)),
                             (width, 2, num_heads, value_dim),
                             (params.EMBED, None, params.HEADS, params.HEAD_DIM))
    self.w_out = params.param(rngs, params.fan_in_init(out_init_scale, in_axis=(0, 1), out_axis=2),
                              (num_heads, value_dim, width),
                              (params.HEADS, params.HEAD_DIM, params.EMBED))
    self.num_heads = num_heads
    self.key_dim = head_dim
    self.value_dim = value_dim
    self.normalize = False
    self.rope_theta = float(rope_theta)
    self.impl = impl
    self.chunk_size = chunk_size or None
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: caches.RecurrentState | None = None):
    """Args: x [B, T, D]; positions [B, T] int32; segment_ids [B, T] (packed documents: the
    state restarts at each); cache from `init_cache` or a previous call. Returns (y [B, T, D],
    the new cache or None)."""
    x = x.astype(self.dtype)
    qk = jnp.einsum("btd,dcnh->btcnh", x, self.w_qk.value.astype(self.dtype))
    vg = jnp.einsum("btd,dcnh->btcnh", x, self.w_vg.value.astype(self.dtype))
    inv_freq = rope.rope_inv_freq(self.key_dim, self.rope_theta)
    q, k = (rope.apply_rope(qk[:, :, i], positions, inv_freq) for i in (0, 1))
    out, cache = self._attend(q, k, vg[:, :, 0], segment_ids=segment_ids, cache=cache,
                              log_decay=retention_log_decay(self.num_heads),
                              scale=self.key_dim ** -0.5)
    gated = jax.nn.swish(vg[:, :, 1].astype(jnp.float32)) * recurrent.rms_normalize(out)
    return self._project_out(gated), cache


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.value_factor = 2         # value (and gate) heads are this times the head dim (the paper: 2)
  c.rope_theta = 10_000.0    # base of the relative-position rotation
  c.impl = "auto"            # auto | reference | recurrent | chunked | pallas
  c.chunk_size = 0           # chunked forms' C; 0 = the op's default (64)
  return c


def validate(model, c, prefix: str = "model.retnet") -> None:
  """Raises ConfigError for the first bad field of the section `c` of `model`."""
  if not isinstance(c.value_factor, int) or c.value_factor < 1:
    raise ConfigError(f"{prefix}.value_factor", c.value_factor, "must be an integer >= 1")
  if not (c.rope_theta > 1 and math.isfinite(float(c.rope_theta))):
    raise ConfigError(f"{prefix}.rope_theta", c.rope_theta, "must be finite and > 1")
  if c.impl not in ops.IMPLS:
    raise ConfigError(f"{prefix}.impl", c.impl, "unknown choice", ops.IMPLS)
  if c.chunk_size < 0:
    raise ConfigError(f"{prefix}.chunk_size", c.chunk_size, "must be >= 0 (0 = the default)")
  if dims.head_dim(model) % 2:
    raise ConfigError("model.head_dim", dims.head_dim(model),
                      f"must be even for {prefix}'s rotation (pairs of features)")


def build(model, c, rngs) -> Retention:
  return Retention(model.width, model.num_heads, dims.head_dim(model),
                   value_factor=c.value_factor, rope_theta=c.rope_theta, impl=c.impl,
                   chunk_size=c.chunk_size, out_init_scale=dims.out_init_scale(model),
                   dtype=dims.DTYPES[model.dtype], rngs=rngs)


SPEC = MixerSpec(name="retnet", aliases=("retention",), section="retnet", defaults=defaults,
                 validate=validate, build=build, cache_types=(caches.RecurrentState,))
