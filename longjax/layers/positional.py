"""Positional-encoding modules and their registry (`model.posenc.kind`).

A positional encoding acts at one or both of two places:
  * the input: added to the token embeddings once (learned, sinusoidal);
  * every attention layer: rotating queries and keys (rope) and/or adding a logits bias (alibi).
Each registry entry names a factory for each place (None where the encoding does not act there).
The maths lives in `longjax.posenc`; these modules only hold parameters and dimensions. The base
classes are in `positional_base` and the learned logit biases in `positional_bias`, so imports
run one way: positional -> positional_bias -> positional_base.
"""

from collections.abc import Callable
import dataclasses
import inspect

from flax import nnx
import jax
import jax.numpy as jnp

from longjax import posenc
from longjax.layers import params
from longjax.layers import positional_bias
from longjax.layers.positional_base import AttentionPositions
from longjax.layers.positional_base import InputPositions
from longjax.ops import AlibiBias


class SinusoidalPositions(InputPositions):

  def __init__(self, width: int):
    self.width = width

  def __call__(self, x, positions):
    return x + posenc.sinusoidal_encoding(positions, self.width).astype(x.dtype)


class LearnedPositions(InputPositions):
  """A learned [max_length, D] table.

  Positions at or beyond `max_length` have no row of their own and are clamped to the last row:
  evaluating beyond the table is allowed (it is what a length-extrapolation study measures) but
  cannot be expected to work.
  """

  def __init__(self, max_length: int, width: int, *, rngs: nnx.Rngs):
    self.table = params.param(rngs, params.normal(width**-0.5), (max_length, width),
                              (params.POSITIONS, params.EMBED))
    self.max_length = max_length

  def __call__(self, x, positions):
    rows = jnp.clip(positions, 0, self.max_length - 1)
    return x + jnp.take(self.table.value, rows, axis=0).astype(x.dtype)


class NoPositions(AttentionPositions):
  pass


class RotaryPositions(AttentionPositions):
  """RoPE on the first `rotary_dim(H, rotary_fraction)` features, optionally with a scaling.

  The scaling (`longjax.posenc.ROPE_SCALINGS`) only changes the inverse frequencies and
  multiplies rotated queries and keys by its attention factor: no parameters, so it can be
  switched on for a trained model. Static scalings are the same at every length. `dynamic_ntk`
  is computed for the context length l = max(positions) + 1 of the call, or, with a decode
  cache, max(cache capacity, that): keys are cached already rotated, so every step of one
  decode must use the same l, and the capacity is the only length known at the first step.
  Prefill without a cache of T tokens therefore equals decoding into a cache of capacity T.
  """

  def __init__(self, head_dim: int, theta: float, *, rotary_fraction: float = 1.0,
               scaling: str = "none", factor: float = 1.0, original_length: int = 0,
               hyperparameters: dict | None = None):
    self.rotary_dim = posenc.rotary_dim(head_dim, rotary_fraction)
    self.theta = theta
    self.scaling = scaling
    self.factor = factor
    self.original_length = original_length
    self.hyperparameters = tuple(sorted((hyperparameters or {}).items()))  # static, hashable
    self._frequencies(None)  # a bad method or value fails when the model is built

  def _frequencies(self, length):
    return posenc.scaled_rope_frequencies(
        self.scaling, self.rotary_dim, theta=self.theta, factor=self.factor,
        original_length=self.original_length, length=length, **dict(self.hyperparameters))

  def rotate(self, x, positions, *, context_length=None, is_key=False):
    del is_key  # RoPE rotates queries and keys alike
    length = None
    if self.scaling in posenc.rope_scaling.DYNAMIC_SCALINGS:
      length = jnp.max(positions) + 1
      if context_length is not None:
        length = jnp.maximum(length, context_length)
    inv_freq, attention_factor = self._frequencies(length)
    return posenc.apply_rope(x, positions, inv_freq, scale=attention_factor)


def rope_scaling_hyperparameters(posenc_cfg) -> dict:
  """The hyperparameters of `posenc_cfg.scaling` from the fields `<scaling>_<name>`.

  E.g. scaling="yarn" reads yarn_beta_fast and yarn_beta_slow as beta_fast and beta_slow; a
  method's argument without a config field keeps the function's default.
  """
  fn = posenc.ROPE_SCALINGS.get(posenc_cfg.scaling)
  if fn is None:
    return {}
  names = [p.name for p in inspect.signature(fn).parameters.values()
           if p.kind is inspect.Parameter.KEYWORD_ONLY
           and p.name not in posenc.rope_scaling.COMMON_ARGS]
  return {n: posenc_cfg[f"{posenc_cfg.scaling}_{n}"] for n in names
          if f"{posenc_cfg.scaling}_{n}" in posenc_cfg}


def _rotary(cfg, rngs) -> RotaryPositions:
  del rngs
  p = cfg.posenc
  return RotaryPositions(_head_dim(cfg), p.rope_theta, rotary_fraction=p.rotary_fraction,
                         scaling=p.scaling, factor=p.factor, original_length=p.original_length,
                         hyperparameters=rope_scaling_hyperparameters(p))


class XPosPositions(AttentionPositions):
  """xPos: RoPE with a per-frequency decay in the distance (`longjax.posenc.xpos`)."""

  def __init__(self, head_dim: int, theta: float, *, rotary_fraction: float = 1.0,
               gamma: float = 0.4, scale_base: float = 512.0):
    self.rotary_dim = posenc.rotary_dim(head_dim, rotary_fraction)
    self.theta = theta
    self.gamma = gamma
    self.scale_base = scale_base

  def rotate(self, x, positions, *, context_length=None, is_key=False):
    del context_length
    inv_freq = posenc.rope_inv_freq(self.rotary_dim, self.theta)
    return posenc.apply_xpos(x, positions, inv_freq, is_key=is_key, gamma=self.gamma,
                             scale_base=self.scale_base)


class ClexPositions(AttentionPositions):
  """CLEX: RoPE whose frequencies follow a learned ODE over the scale t (`longjax.posenc.clex`).

  t = ceil(l / L) for the context length l = max(positions) + 1, or with a decode cache the
  larger of that and the cache capacity (as for dynamic NTK: cached keys were rotated with the
  capacity's t). In training the `clex` position transform spreads positions over [0, t L), so
  the same rule recovers the sampled t.
  """

  def __init__(self, head_dim: int, theta: float, *, original_length: int,
               rotary_fraction: float = 1.0, hidden_factor: int = 1, rngs: nnx.Rngs):
    if original_length < 1:
      raise ValueError(f"CLEX needs the training length, got original_length={original_length}")
    self.rotary_dim = posenc.rotary_dim(head_dim, rotary_fraction)
    if self.rotary_dim < 4:
      raise ValueError(f"CLEX needs >= 4 rotated features, got {self.rotary_dim}")
    self.theta = theta
    self.original_length = original_length
    init = posenc.clex.init_params(rngs.params(), self.rotary_dim, hidden_factor)
    self.w1 = nnx.Param(init["w1"], out_sharding=(None, None), eager_sharding=False)
    self.w2 = nnx.Param(init["w2"], out_sharding=(None, None), eager_sharding=False)

  def inv_freq(self, length) -> jax.Array:
    """[R/2] inverse frequencies for a context of `length` tokens."""
    t = posenc.clex.scale_for_length(length, self.original_length)
    return posenc.clex.clex_inv_freq({"w1": self.w1.value, "w2": self.w2.value}, t,
                                     rotary_dim=self.rotary_dim, theta=self.theta)

  def rotate(self, x, positions, *, context_length=None, is_key=False):
    del is_key
    length = jnp.max(positions) + 1
    if context_length is not None:
      length = jnp.maximum(length, context_length)
    return posenc.apply_rope(x, positions, self.inv_freq(length))


class AlibiPositions(AttentionPositions):

  def __init__(self, num_heads: int):
    # Only the head count is stored: an array attribute would become part of the model's state,
    # i.e. a parameter the optimizer trains.
    self.num_heads = num_heads

  def bias(self, q_positions, kv_positions):
    return AlibiBias(jnp.asarray(posenc.alibi_slopes(self.num_heads)), q_positions, kv_positions)


@dataclasses.dataclass(frozen=True)
class PosEncEntry:
  """Factories from (model config, rngs) to the modules of one encoding.

  `logit_bias`: whether the attention module adds a bias to the logits (kernels that cannot
  compute a position-based bias in-kernel refuse such encodings).
  """
  input: Callable[..., InputPositions] | None
  attention: Callable[..., AttentionPositions]
  logit_bias: bool = False


def _head_dim(cfg) -> int:
  return cfg.head_dim or cfg.width // cfg.num_heads


POSENCS: dict[str, PosEncEntry] = {
    "nope": PosEncEntry(None, lambda cfg, rngs: NoPositions()),
    "rope": PosEncEntry(None, lambda cfg, rngs: _rotary(cfg, rngs)),
    "xpos": PosEncEntry(None, lambda cfg, rngs: XPosPositions(
        _head_dim(cfg), cfg.posenc.rope_theta, rotary_fraction=cfg.posenc.rotary_fraction,
        gamma=cfg.posenc.xpos_gamma, scale_base=cfg.posenc.xpos_scale_base)),
    "clex": PosEncEntry(None, lambda cfg, rngs: ClexPositions(
        _head_dim(cfg), cfg.posenc.rope_theta, original_length=cfg.posenc.original_length,
        rotary_fraction=cfg.posenc.rotary_fraction, hidden_factor=cfg.posenc.clex_hidden_factor,
        rngs=rngs)),
    "alibi": PosEncEntry(None, lambda cfg, rngs: AlibiPositions(cfg.num_heads), logit_bias=True),
    "sinusoidal": PosEncEntry(lambda cfg, rngs: SinusoidalPositions(cfg.width),
                              lambda cfg, rngs: NoPositions()),
    "learned": PosEncEntry(
        lambda cfg, rngs: LearnedPositions(cfg.posenc.max_length, cfg.width, rngs=rngs),
        lambda cfg, rngs: NoPositions()),
    **{name: PosEncEntry(None, factory, logit_bias=True)
       for name, factory in positional_bias.FACTORIES.items()},
}
