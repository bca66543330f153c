"""Learned logit-bias encodings: modules that hold the parameters of T5, KERPLE and FIRE biases.

Each module is an `AttentionPositions` that only biases the logits: `bias(q_positions,
kv_positions)` builds the spec of `longjax.ops.biases` from its parameters (after any positivity
transform) on every call, and `dot_product_attention` differentiates the spec's float fields. The
parameters are per attention layer (the model stacks them over layers like every other
parameter); the T5 and KERPLE papers share one set across layers, which these modules do not.
Registered in `longjax.layers.positional.POSENCS` as "t5", "kerple_log", "kerple_power", "fire".
"""

from flax import nnx
import jax
import jax.numpy as jnp

from longjax import posenc
from longjax.layers import params
from longjax.layers.positional_base import AttentionPositions
from longjax.ops import FireBias, KerpleBias, T5Bias

# KERPLE keeps r1, r2 >= this floor (the authors' release clamps them at 0.01): a kernel whose
# scale reaches 0 would switch its head's positional signal off with no gradient to bring it back.
KERPLE_FLOOR = 0.01
# KERPLE's power kernel -r1 |m - n|^r2 is conditionally positive definite only for r2 <= 2.
KERPLE_MAX_POWER = 2.0
# Initial ranges (uniform, per head) from the authors' release of the paper: log kernel
# r1 ~ U(0, 2), r2 ~ U(0, 1); power kernel r1 ~ U(0, 1), r2 ~ U(0, 2).
KERPLE_INIT = {"log": ((0.0, 2.0), (0.0, 1.0)), "power": ((0.0, 1.0), (0.0, 2.0))}


def _inverse_softplus(y: jax.Array) -> jax.Array:
  return y + jnp.log(-jnp.expm1(-y))  # log(exp(y) - 1), stable for large y


def _uniform_raw(lo: float, hi: float, to_raw):
  """Initializer: values uniform in (lo, hi) (kept just inside), mapped to raw parameters."""

  def init(key, shape, dtype=jnp.float32):
    margin = 1e-3 * (hi - lo)
    value = jax.random.uniform(key, shape, jnp.float32, lo + margin, hi - margin)
    return to_raw(value).astype(dtype)

  return init


def _given(value: jax.Array):
  """Initializer returning `value` (drawn beforehand, e.g. jointly with another parameter)."""
  return lambda key, shape, dtype=jnp.float32: jnp.asarray(value, dtype).reshape(shape)


class T5Positions(AttentionPositions):
  """T5 relative bias: a learned [num_buckets, N] table (Raffel et al. 2020).

  The table starts at zero: the paper states no initialisation, and zeros make the model start
  as NoPE, every bucket's bias then being learned from data.
  """

  def __init__(self, num_heads: int, *, num_buckets: int = 32, max_distance: int = 128,
               bidirectional: bool = False, rngs: nnx.Rngs):
    if num_buckets < (4 if bidirectional else 2) or num_buckets % (2 if bidirectional else 1):
      raise ValueError(f"num_buckets={num_buckets} must be >= 2 (bidirectional: even, >= 4)")
    exact = num_buckets // (4 if bidirectional else 2)
    if max_distance <= exact:
      raise ValueError(f"max_distance={max_distance} must exceed the {exact} exact buckets")
    self.table = params.param(rngs, jax.nn.initializers.zeros, (num_buckets, num_heads),
                              (None, params.HEADS))
    self.max_distance = max_distance
    self.bidirectional = bidirectional

  def bias(self, q_positions, kv_positions):
    return T5Bias(table=self.table.value, q_positions=q_positions, kv_positions=kv_positions,
                  max_distance=self.max_distance, bidirectional=self.bidirectional)


class KerplePositions(AttentionPositions):
  """KERPLE bias with learned r1, r2 per head (Chi et al. 2022).

  Parametrisation: r = floor + softplus(raw) (log kernel, and r1 of the power kernel), and
  r2 = floor + (2 - floor) * sigmoid(raw) for the power kernel, so the constraints hold for any
  raw value instead of being restored by clamping after each step. Initial r1, r2 as in
  `KERPLE_INIT`.
  """

  def __init__(self, num_heads: int, *, kind: str, rngs: nnx.Rngs):
    if kind not in posenc.relative_bias.KERPLE_KINDS:
      raise ValueError(f"kind={kind!r}; valid: {posenc.relative_bias.KERPLE_KINDS}")
    (r1_lo, r1_hi), (r2_lo, r2_hi) = KERPLE_INIT[kind]
    floor = KERPLE_FLOOR
    raw_r1 = lambda r: _inverse_softplus(jnp.maximum(r - floor, 1e-4))
    if kind == "log":
      raw_r2 = raw_r1
    else:
      raw_r2 = lambda r: jax.scipy.special.logit(
          jnp.clip((r - floor) / (KERPLE_MAX_POWER - floor), 1e-4, 1 - 1e-4))
    self.raw_r1 = params.param(rngs, _uniform_raw(r1_lo, r1_hi, raw_r1), (num_heads,),
                               (params.HEADS,))
    self.raw_r2 = params.param(rngs, _uniform_raw(r2_lo, r2_hi, raw_r2), (num_heads,),
                               (params.HEADS,))
    self.kind = kind

  def kernel_parameters(self) -> tuple[jax.Array, jax.Array]:
    """(r1, r2), each [N] float32 within their constraints."""
    r1 = KERPLE_FLOOR + jax.nn.softplus(self.raw_r1.value)
    if self.kind == "log":
      r2 = KERPLE_FLOOR + jax.nn.softplus(self.raw_r2.value)
    else:
      r2 = KERPLE_FLOOR + (KERPLE_MAX_POWER - KERPLE_FLOOR) * jax.nn.sigmoid(self.raw_r2.value)
    return r1, r2

  def bias(self, q_positions, kv_positions):
    r1, r2 = self.kernel_parameters()
    return KerpleBias(r1=r1, r2=r2, q_positions=q_positions, kv_positions=kv_positions,
                      kind=self.kind)


class FirePositions(AttentionPositions):
  """FIRE bias (Li et al. 2024): an MLP of the progressively interpolated distance.

  As in the paper: f is a 1 -> `hidden` -> N MLP with ReLU, psi(x) = log(|c| x + 1) with c
  learned from `c_init` (0.1), and the threshold L learned from `threshold_init` (512) as
  `threshold_init * |s|` with s starting at 1, so that an optimiser step moves L by a fraction of
  its size rather than by the same absolute amount as the other parameters.

  Initialisation of f (ours; the paper uses its framework's default): hidden unit k is
  relu(w_k (x - t_k)) with w_k = |N(0, 1)| and knots t_k uniform in [0, 1), and the output weights
  are -|N(0, 1/hidden)|, b2 = 0. So every head's bias starts as a decreasing, piecewise-linear
  function of the normalised distance (a locality prior, like ALiBi's and KERPLE's), which
  training is free to reshape.
  """

  def __init__(self, num_heads: int, *, hidden: int = 32, c_init: float = 0.1,
               threshold_init: float = 512.0, rngs: nnx.Rngs):
    if hidden < 1 or c_init <= 0 or threshold_init <= 0:
      raise ValueError(f"FIRE needs hidden >= 1, c_init > 0 and threshold_init > 0, got "
                       f"{hidden}, {c_init}, {threshold_init}")
    self.c = params.param(rngs, jax.nn.initializers.constant(c_init), (), ())
    self.threshold_scale = params.param(rngs, jax.nn.initializers.ones, (), ())
    self.threshold_init = float(threshold_init)
    # Hidden unit k is relu(w1_k x + b1_k) = relu(w1_k (x - knot_k)) at initialisation.
    w1_key, knot_key = jax.random.split(rngs.params())
    w1 = jnp.abs(jax.random.normal(w1_key, (hidden,), jnp.float32))
    knots = jax.random.uniform(knot_key, (hidden,), jnp.float32)
    self.w1 = params.param(rngs, _given(w1), (hidden,), (None,))
    self.b1 = params.param(rngs, _given(-w1 * knots), (hidden,), (None,))
    self.w2 = params.param(rngs, lambda key, shape, dtype: -jnp.abs(
        jax.random.normal(key, shape, dtype)) * hidden**-0.5, (hidden, num_heads),
                           (None, params.HEADS))
    self.b2 = params.param(rngs, jax.nn.initializers.zeros, (num_heads,), (params.HEADS,))

  def fire_params(self) -> posenc.FireParams:
    return posenc.FireParams(
        c=jnp.abs(self.c.value),
        threshold=self.threshold_init * jnp.abs(self.threshold_scale.value),
        w1=self.w1.value, b1=self.b1.value, w2=self.w2.value, b2=self.b2.value)

  def bias(self, q_positions, kv_positions):
    return FireBias(params=self.fire_params(), q_positions=q_positions,
                    kv_positions=kv_positions)


# Config name -> factory(model config, rngs); `longjax.layers.positional.POSENCS` registers them.
FACTORIES = {
    "t5": lambda cfg, rngs: T5Positions(
        cfg.num_heads, num_buckets=cfg.posenc.t5_num_buckets,
        max_distance=cfg.posenc.t5_max_distance, bidirectional=cfg.posenc.t5_bidirectional,
        rngs=rngs),
    "kerple_log": lambda cfg, rngs: KerplePositions(cfg.num_heads, kind="log", rngs=rngs),
    "kerple_power": lambda cfg, rngs: KerplePositions(cfg.num_heads, kind="power", rngs=rngs),
    "fire": lambda cfg, rngs: FirePositions(
        cfg.num_heads, hidden=cfg.posenc.fire_hidden, c_init=cfg.posenc.fire_c_init,
        threshold_init=cfg.posenc.fire_threshold_init, rngs=rngs),
}
