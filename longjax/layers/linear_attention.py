"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"): the mixer `linear`.

softmax(q k^T) v is replaced by phi(q) (phi(k)^T v) with a feature map phi, so the causal sum
becomes a recurrence over a [Dk, Dv] state and decoding costs O(1) per token whatever the
context. Normalised (the paper's form), o_t = phi(q_t) S_t / (phi(q_t) . z_t); unnormalised, the
output is scaled by Dk ** -0.5 instead. With `feature_map="taylor2"` and a small `feature_dim`
it is Based's linear attention (Arora et al. 2024): phi(q) . phi(k) = 1 + u + u^2/2 with
u = q . k / sqrt(F), exp(u) to second order, on q and k projected to F (16) features. With
`feature_map="hedgehog"` it is Hedgehog's learnable map (Zhang et al. 2024): per head
phi(x) = [softmax(x W + b), softmax(-(x W + b))], separate W, b for queries and keys, the
identity at init. The maths is `longjax.ops.linear_attention`; this module holds the
projections. Linear attention
takes no rotary or bias position encoding: the causal sum orders the tokens (`model.posenc`
applies to the model's attention layers; an embedding-level encoding such as `learned` applies
to every layer).

Config: `model.linear` (`defaults` below); `--config.model.mixers=linear`.
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


class LinearAttention(recurrent.RecurrentMixer):
  """Multi-head causal linear attention with a feature map; decodes from a constant state."""

  def __init__(self, width: int, num_heads: int, head_dim: int, *, feature_map: str = "elu1",
               feature_dim: int = 0, normalize: bool = True, impl: str = "auto",
               chunk_size: int = 0, out_init_scale: float = 1.0, dtype=jnp.float32,
               rngs: nnx.Rngs):
    # q and k are projected to `feature_dim` features before the map (Based: 16, so that its
    # 1 + F + F^2 Taylor features stay small); values keep the head dim.
    feature_dim = feature_dim or head_dim
    self.w_qk = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2, 3)),
                             (width, 2, num_heads, feature_dim),
                             (params.EMBED, None, params.HEADS, params.HEAD_DIM))
    self.w_v = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2)),
                            (width, num_heads, head_dim),
                            (params.EMBED, params.HEADS, params.HEAD_DIM))
    self.w_out = params.param(rngs, params.fan_in_init(out_init_scale, in_axis=(0, 1), out_axis=2),
                              (num_heads, head_dim, width),
                              (params.HEADS, params.HEAD_DIM, params.EMBED))
    if feature_map == "hedgehog":
      # Separate maps for queries and keys, per head; the identity at init (Hedgehog's).
      self.feature_weight = params.param(
          rngs, lambda k, s, d: jnp.broadcast_to(jnp.eye(s[-1], dtype=d), s),
          (2, num_heads, feature_dim, feature_dim), (None, params.HEADS, None, None))
      self.feature_bias = params.param(rngs, jax.nn.initializers.zeros,
                                       (2, num_heads, feature_dim), (None, params.HEADS, None))
    self.num_heads = num_heads
    self.value_dim = head_dim
    self.feature_map = feature_map
    self.key_dim = ops.feature_size(feature_map, feature_dim)  # Dk of the state
    self.normalize = normalize
    self.impl = impl
    self.chunk_size = chunk_size or None
    self.dtype = dtype

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: caches.RecurrentState | None = None):
    """Args: x [B, T, D]; positions [B, T] (unused: see the module docstring); segment_ids
    [B, T] (packed documents: the state restarts at each); cache from `init_cache` or a
    previous call. Returns (y [B, T, D], the new cache or None)."""
    del positions
    x = x.astype(self.dtype)
    qk = jnp.einsum("btd,dcnh->btcnh", x, self.w_qk.value.astype(self.dtype))
    v = jnp.einsum("btd,dnh->btnh", x, self.w_v.value.astype(self.dtype))
    if self.feature_map == "hedgehog":
      w, b = self.feature_weight.value, self.feature_bias.value
      q, k = (ops.hedgehog_features(qk[:, :, i], w[i], b[i]) for i in (0, 1))
    else:
      phi = ops.FEATURE_MAPS[self.feature_map]
      q, k = phi(qk[:, :, 0]), phi(qk[:, :, 1])
    out, cache = self._attend(q, k, v, segment_ids=segment_ids, cache=cache,
                              scale=1.0 if self.normalize else self.key_dim ** -0.5)
    return self._project_out(out), cache


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.feature_map = "elu1"  # identity | elu1 (elu(x) + 1) | relu | taylor2 (Based) | hedgehog
  c.feature_dim = 0       # q/k width before the map; 0 = the head dim (Based: 16 with taylor2)
  c.normalize = True      # divide by phi(q) . sum phi(k) (needs a non-negative feature map)
  c.impl = "auto"         # auto | reference | recurrent | chunked | pallas
  c.chunk_size = 0        # chunked forms' C; 0 = the op's default (64)
  return c


def validate(model, c, prefix: str = "model.linear") -> None:
  """Raises ConfigError for the first bad field of the section `c` of `model`."""
  maps = sorted((*ops.FEATURE_MAPS, *ops.LEARNABLE_FEATURE_MAPS))
  if c.feature_map not in maps:
    raise ConfigError(f"{prefix}.feature_map", c.feature_map, "unknown choice", maps)
  if c.normalize and c.feature_map not in ops.POSITIVE_FEATURE_MAPS:
    raise ConfigError(f"{prefix}.normalize", c.normalize,
                      f"needs a non-negative feature map (phi(q) . sum phi(k) > 0), but "
                      f"{prefix}.feature_map={c.feature_map!r}", [False])
  limit = 64 if c.feature_map == "taylor2" else 4096
  if not isinstance(c.feature_dim, int) or not 0 <= c.feature_dim <= limit:
    raise ConfigError(f"{prefix}.feature_dim", c.feature_dim,
                      f"must be in 0..{limit} for feature_map={c.feature_map!r} (0 = the head "
                      "dim; taylor2's state grows as the square)")
  if c.feature_map == "taylor2" and not c.feature_dim and dims.head_dim(model) > limit:
    raise ConfigError(f"{prefix}.feature_dim", c.feature_dim,
                      f"taylor2 on the head dim {dims.head_dim(model)} would carry "
                      f"{ops.feature_size('taylor2', dims.head_dim(model))} features per head; "
                      f"set a feature_dim in 1..{limit} (Based: 16)")
  if c.impl not in ops.IMPLS:
    raise ConfigError(f"{prefix}.impl", c.impl, "unknown choice", ops.IMPLS)
  if c.chunk_size < 0:
    raise ConfigError(f"{prefix}.chunk_size", c.chunk_size, "must be >= 0 (0 = the default)")


def build(model, c, rngs) -> LinearAttention:
  return LinearAttention(model.width, model.num_heads, dims.head_dim(model),
                         feature_map=c.feature_map, feature_dim=c.feature_dim,
                         normalize=c.normalize, impl=c.impl,
                         chunk_size=c.chunk_size, out_init_scale=dims.out_init_scale(model),
                         dtype=dims.DTYPES[model.dtype], rngs=rngs)


SPEC = MixerSpec(name="linear", aliases=("linear_attention",), section="linear",
                 defaults=defaults, validate=validate, build=build,
                 cache_types=(caches.RecurrentState,))
