"""TransNormerLLM's gated linear attention with decay, trained with Lightning Attention's tiling
(Qin et al. 2023, "TransNormerLLM: A Faster and Better Large Language Model with Improved
TransNormer"; Qin et al. 2024, "Various Lengths, Constant Speed: Efficient Language Modeling
with Lightning Attention" / "Lightning Attention-2"): the mixer `lightning`.

  q = swish(x W_q),  k = swish(x W_k),  v = x W_v,  u = x W_u
  S_t = lambda_h S_{t-1} + k_t^T v_t,   o_t = q_t S_t
  y = (u * SRMSNorm(o)) W_o

with lambda_h = exp(-s_h * decay_scale), s_h the ALiBi slope of head h (2^(-8 (h+1) / N) for N
a power of two), and SRMSNorm(o) = o / RMS(o) over the concatenated heads, without a gain.
TransNormerLLM scales the slopes per layer l of L by (1 - l / (L - 1) + 1e-5), so its first
layer decays fastest and its last not at all; here `decay_scale` is that factor, one value per
mixer entry: the paper's schedule for 4 layers is
`mixers="lightning(decay_scale=1.0),lightning(decay_scale=0.6667),lightning(decay_scale=0.3333),
lightning(decay_scale=0.00001)"` (the default 1.0 everywhere is its first layer's decay). No
LRPE rotation is applied.

The maths is `longjax.ops.linear_attention` (chunked: Lightning Attention-2's intra/inter
split; the Pallas kernel on TPU/GPU). Config: `model.lightning`.
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from longjax.errors import ConfigError
from longjax.layers import caches
from longjax.layers import dims
from longjax.layers import params
from longjax.layers.mixer import MixerSpec
from longjax.ops import linear_attention as ops
from longjax.posenc import alibi

_NORM_EPS = 1e-6


def lightning_log_decay(num_heads: int, decay_scale: float) -> jax.Array:
  """log lambda_h = -s_h * decay_scale: [N] float32."""
  return -jnp.asarray(alibi.alibi_slopes(num_heads)) * decay_scale


class Lightning(nnx.Module):
  """Gated linear attention with per-head decay and SRMSNorm (TransNormerLLM's token mixer)."""

  def __init__(self, width: int, num_heads: int, head_dim: int, *, decay_scale: float = 1.0,
               impl: str = "auto", chunk_size: int = 0, out_init_scale: float = 1.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    # q, k, v and the gate u share one [D, 4, N, H] matrix: one matmul.
    self.w_qkvu = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2, 3)),
                               (width, 4, num_heads, head_dim),
                               (params.EMBED, None, params.HEADS, params.HEAD_DIM))
    self.w_out = params.param(rngs, params.fan_in_init(out_init_scale, in_axis=(0, 1), out_axis=2),
                              (num_heads, head_dim, width),
                              (params.HEADS, params.HEAD_DIM, params.EMBED))
    self.num_heads = num_heads
    self.head_dim = head_dim
    self.decay_scale = float(decay_scale)
    self.impl = impl
    self.chunk_size = chunk_size or None
    self.dtype = dtype

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> caches.RecurrentState:
    """The [B, N, H, H] state, whatever `max_length`."""
    del max_length, dtype  # the state is float32 and constant in the length
    return caches.RecurrentState.empty(ops.state_shape(batch_size, self.num_heads, self.head_dim,
                                                       self.head_dim, normalize=False))

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: caches.RecurrentState | None = None):
    """Args: x [B, T, D]; positions [B, T] (unused: the decay orders the tokens); segment_ids
    [B, T] (packed documents: the state restarts at each); cache from `init_cache` or a
    previous call. Returns (y [B, T, D], the new cache or None)."""
    del positions
    if cache is not None and segment_ids is not None:
      raise ValueError("segment_ids are for packed training batches; a cache holds one sequence "
                       "per row")
    x = x.astype(self.dtype)
    qkvu = jnp.einsum("btd,dcnh->btcnh", x, self.w_qkvu.value.astype(self.dtype))
    q, k = jax.nn.swish(qkvu[:, :, 0]), jax.nn.swish(qkvu[:, :, 1])
    out, state = ops.linear_attention(
        q, k, qkvu[:, :, 2], log_decay=lightning_log_decay(self.num_heads, self.decay_scale),
        segment_ids=segment_ids, initial_state=None if cache is None else cache.state,
        impl=self.impl, chunk_size=self.chunk_size)
    out32 = out.astype(jnp.float32)
    # SRMSNorm over all heads' features of a token (the concatenated [N * H] vector).
    normed = out32 * jax.lax.rsqrt(jnp.mean(out32 * out32, axis=(-2, -1), keepdims=True)
                                   + _NORM_EPS)
    gated = qkvu[:, :, 3].astype(jnp.float32) * normed
    if cache is not None:
      cache = dataclasses.replace(cache, state=state, end=cache.end + x.shape[1])
    y = jnp.einsum("btnh,nhd->btd", gated.astype(self.dtype), self.w_out.value.astype(self.dtype))
    return y, cache


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.decay_scale = 1.0  # lambda_h = exp(-alibi_slope_h * this); TransNormerLLM: 1 - l/(L-1)
  c.impl = "auto"      # auto | reference | recurrent | chunked | pallas
  c.chunk_size = 0     # chunked forms' C; 0 = the op's default (64)
  return c


def validate(model, c, prefix: str = "model.lightning") -> None:
  """Raises ConfigError for the first bad field of the section `c` of `model`."""
  del model
  if not isinstance(c.decay_scale, (int, float)) or not 0 < c.decay_scale <= 1e3:
    raise ConfigError(f"{prefix}.decay_scale", c.decay_scale,
                      "must be in (0, 1000] (0 would be no decay: use mixers=linear)")
  if c.impl not in ops.IMPLS:
    raise ConfigError(f"{prefix}.impl", c.impl, "unknown choice", ops.IMPLS)
  if c.chunk_size < 0:
    raise ConfigError(f"{prefix}.chunk_size", c.chunk_size, "must be >= 0 (0 = the default)")


def build(model, c, rngs) -> Lightning:
  return Lightning(model.width, model.num_heads, dims.head_dim(model),
                   decay_scale=c.decay_scale, impl=c.impl, chunk_size=c.chunk_size,
                   out_init_scale=dims.out_init_scale(model), dtype=dims.DTYPES[model.dtype],
                   rngs=rngs)


SPEC = MixerSpec(name="lightning", aliases=("transnormer",), section="lightning",
                 defaults=defaults, validate=validate, build=build,
                 cache_types=(caches.RecurrentState,))
