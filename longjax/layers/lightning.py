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
from longjax.posenc import alibi


def lightning_log_decay(num_heads: int, decay_scale: float) -> jax.Array:
  """log lambda_h = -s_h * decay_scale: [N] float32."""
  return -jnp.asarray(alibi.alibi_slopes(num_heads)) * decay_scale


class Lightning(recurrent.RecurrentMixer):
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
    self.key_dim = self.value_dim = head_dim
    self.normalize = False
    self.decay_scale = float(decay_scale)
    self.impl = impl
    self.chunk_size = chunk_size or None
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: caches.RecurrentState | None = None):
    """Args: x [B, T, D]; positions [B, T] (unused: the decay orders the tokens); segment_ids
    [B, T] (packed documents: the state restarts at each); cache from `init_cache` or a
    previous call. Returns (y [B, T, D], the new cache or None)."""
    del positions
    x = x.astype(self.dtype)
    qkvu = jnp.einsum("btd,dcnh->btcnh", x, self.w_qkvu.value.astype(self.dtype))
    q, k = jax.nn.swish(qkvu[:, :, 0]), jax.nn.swish(qkvu[:, :, 1])
    out, cache = self._attend(
        q, k, qkvu[:, :, 2], segment_ids=segment_ids, cache=cache,
        log_decay=lightning_log_decay(self.num_heads, self.decay_scale))
    # SRMSNorm over all heads' features of a token (the concatenated [N * H] vector).
    gated = qkvu[:, :, 3].astype(jnp.float32) * recurrent.rms_normalize(out, axis=(-2, -1))
    return self._project_out(gated), cache

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
