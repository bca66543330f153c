"""Gated linear attention (Yang, Wang, Shen, Panda & Kim 2024, "Gated Linear Attention
Transformers with Hardware-Efficient Training"): the mixer `gla`.

A data-dependent decay per key channel, from a low-rank gate:

  q = x W_q,  k = x W_k          (key heads key_factor * H wide; the paper's 0.5)
  v = x W_v,  r = swish(x W_r)   (value and output-gate heads H wide)
  alpha_t = sigmoid(x W_a1 W_a2 + b)^(1 / tau)        (W_a1: D x rank; tau = 16)
  S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,   o_t = q_t S_t / sqrt(Dk)
  y = (r * RMSNorm_h(o)) W_o

The maths is `longjax.ops.linear_attention` with `log_decay = log sigmoid(.) / tau` per channel
[B, T, N, Dk]: its chunked form (16-step chunks; the Pallas kernel on TPU/GPU) trains, its
recurrence decodes from a [N, Dk, H] state. RMSNorm_h normalises each head's output (with a gain
per feature, as the paper's per-head norm).

Config: `model.gla` (`defaults` below); `--config.model.mixers=gla`.
"""

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


def key_dim(head_dim: int, key_factor: float) -> int:
  """Dk, the key (and query) width per head: key_factor * H, at least 1."""
  return max(1, int(round(key_factor * head_dim)))


class GatedLinearAttention(recurrent.RecurrentMixer):
  """GLA: linear attention with a data-dependent per-channel decay and an output gate."""

  def __init__(self, width: int, num_heads: int, head_dim: int, *, key_factor: float = 0.5,
               gate_rank: int = 16, gate_temperature: float = 16.0, impl: str = "auto",
               chunk_size: int = 0, out_init_scale: float = 1.0, dtype=jnp.float32,
               rngs: nnx.Rngs):
    dk = key_dim(head_dim, key_factor)
    self.w_qk = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2, 3)),
                             (width, 2, num_heads, dk),
                             (params.EMBED, None, params.HEADS, params.HEAD_DIM))
    # Values and the output gate r share one [D, 2, N, H] matrix.
    self.w_vr = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2, 3)),
                             (width, 2, num_heads, head_dim),
                             (params.EMBED, None, params.HEADS, params.HEAD_DIM))
    self.w_gate_down = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=1),
                                    (width, gate_rank), (params.EMBED, None))
    self.w_gate_up = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2)),
                                  (gate_rank, num_heads, dk),
                                  (None, params.HEADS, params.HEAD_DIM))
    self.gate_bias = params.param(rngs, jax.nn.initializers.zeros, (num_heads, dk),
                                  (params.HEADS, params.HEAD_DIM))
    self.norm_scale = params.param(rngs, jax.nn.initializers.ones, (head_dim,),
                                   (params.HEAD_DIM,))
    self.w_out = params.param(rngs, params.fan_in_init(out_init_scale, in_axis=(0, 1), out_axis=2),
                              (num_heads, head_dim, width),
                              (params.HEADS, params.HEAD_DIM, params.EMBED))
    self.num_heads = num_heads
    self.key_dim, self.value_dim = dk, head_dim
    self.normalize = False
    self.gate_temperature = float(gate_temperature)
    self.impl = impl
    self.chunk_size = chunk_size or None
    self.dtype = dtype

  def log_decay(self, x: jax.Array) -> jax.Array:
    """log alpha_t = log sigmoid(x W_a1 W_a2 + b) / tau: [B, T, N, Dk] float32, < 0."""
    low = jnp.einsum("btd,dr->btr", x, self.w_gate_down.value.astype(x.dtype))
    logits = jnp.einsum("btr,rnk->btnk", low, self.w_gate_up.value.astype(x.dtype))
    logits = logits.astype(jnp.float32) + self.gate_bias.value
    return jax.nn.log_sigmoid(logits) / self.gate_temperature

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: caches.RecurrentState | None = None):
    """Args: x [B, T, D]; positions [B, T] (unused: the gates order the tokens); segment_ids
    [B, T] (packed documents: the state restarts at each); cache from `init_cache` or a
    previous call. Returns (y [B, T, D], the new cache or None)."""
    del positions
    x = x.astype(self.dtype)
    qk = jnp.einsum("btd,dcnh->btcnh", x, self.w_qk.value.astype(self.dtype))
    vr = jnp.einsum("btd,dcnh->btcnh", x, self.w_vr.value.astype(self.dtype))
    out, cache = self._attend(qk[:, :, 0], qk[:, :, 1], vr[:, :, 0], segment_ids=segment_ids,
                              cache=cache, log_decay=self.log_decay(x),
                              scale=self.key_dim ** -0.5)
    normed = recurrent.rms_normalize(out) * self.norm_scale.value
    return self._project_out(jax.nn.swish(vr[:, :, 1].astype(jnp.float32)) * normed), cache

def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.key_factor = 0.5         # key/query heads are this times the head dim (the paper: 0.5)
  c.gate_rank = 16           # rank of the decay gate's projection W_a1 W_a2 (the paper: 16)
  c.gate_temperature = 16.0  # tau: alpha = sigmoid(.)^(1/tau), near 1 at init (the paper: 16)
  c.impl = "auto"            # auto | reference | recurrent | chunked | pallas
  c.chunk_size = 0           # chunked form's C; 0 = the op's default (16 per channel)
  return c


def validate(model, c, prefix: str = "model.gla") -> None:
  """Raises ConfigError for the first bad field of the section `c` of `model`."""
  if not isinstance(c.key_factor, (int, float)) or not 0 < c.key_factor <= 4:
    raise ConfigError(f"{prefix}.key_factor", c.key_factor, "must be in (0, 4]")
  if not isinstance(c.gate_rank, int) or c.gate_rank < 1:
    raise ConfigError(f"{prefix}.gate_rank", c.gate_rank, "must be an integer >= 1")
  if not isinstance(c.gate_temperature, (int, float)) or c.gate_temperature < 1:
    raise ConfigError(f"{prefix}.gate_temperature", c.gate_temperature,
                      "must be >= 1 (alpha = sigmoid(.)^(1/tau))")
  if c.impl not in ops.IMPLS:
    raise ConfigError(f"{prefix}.impl", c.impl, "unknown choice", ops.IMPLS)
  if c.chunk_size < 0:
    raise ConfigError(f"{prefix}.chunk_size", c.chunk_size, "must be >= 0 (0 = the default)")
  del model


def build(model, c, rngs) -> GatedLinearAttention:
  return GatedLinearAttention(
      model.width, model.num_heads, dims.head_dim(model), key_factor=c.key_factor,
      gate_rank=c.gate_rank, gate_temperature=c.gate_temperature, impl=c.impl,
      chunk_size=c.chunk_size, out_init_scale=dims.out_init_scale(model),
      dtype=dims.DTYPES[model.dtype], rngs=rngs)


SPEC = MixerSpec(name="gla", aliases=("gated_linear_attention",), section="gla",
                 defaults=defaults, validate=validate, build=build,
                 cache_types=(caches.RecurrentState,))
