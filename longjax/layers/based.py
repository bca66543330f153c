"""Based (Arora, Eyuboglu, Zhang, Timalsina, Alberti, Zinsley, Zou, Rudra & Ré 2024, "Simple
linear attention language models balance the recall-throughput tradeoff"): the mixer `based`.

The paper's three primitives in one layer, so that `--config.model.mixers=based` is the
architecture and a pattern (`based,based,based,attention`) mixes it with others:

  c = x + conv_K(x) * (x W_g)                    gated short causal convolution (BaseConv, K = 3)
  q, k = phi(c W_q), phi(c W_k)                  F = 16 features per head, phi = 2nd-order Taylor
  v = c W_v                                      (phi(q).phi(k) = 1 + u + u^2/2, u = q.k/sqrt(F))
  o_lin_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / sum_{s<=t} phi(q_t).phi(k_s)      global, O(1) state
  o_win_t = softmax over t-W < s <= t of rot(q'_t).rot(k'_s) / sqrt(H), of v_s    local, exact
  y = (o_lin + o_win) W_o                        (q', k' = c W_q', c W_k', rotary)

The paper stacks the primitives as separate layers (gated convolutions, Taylor linear attention,
window-64 attention); here the linear and window branches share the values and the output
projection and add, the way both approximate one softmax attention: exact over the last W
tokens, the Taylor kernel over all. The separate-layer stack remains a pattern:
`linear(feature_map=taylor2,feature_dim=16),attention(window=64)`.

Training runs the chunked linear attention (`longjax.ops.linear_attention`), the attention op
with a window (`longjax.ops.dot_product_attention`) and the convolution (`longjax.ops.short_conv`);
decoding carries a `BasedState` of N * (1 + F + F^2) * (H + 1) float32 + (K - 1) * D + 2 * W * N * H
values, constant in the length. Packed documents reset all three.

Config: `model.based` (`defaults` below); `--config.model.mixers=based`.
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
from longjax.ops import AttentionMask
from longjax.ops import dot_product_attention
from longjax.ops import linear_attention as ops
from longjax.ops import short_conv
from longjax.posenc import rope

MAX_FEATURE_DIM = 64  # taylor2's state has 1 + F + F^2 rows per head


class Based(recurrent.RecurrentMixer):
  """Gated short convolution, then Taylor linear attention plus sliding-window softmax."""

  def __init__(self, width: int, num_heads: int, head_dim: int, *, feature_dim: int = 16,
               conv_size: int = 3, window: int = 64, rope_theta: float = 10_000.0,
               impl: str = "auto", chunk_size: int = 0, out_init_scale: float = 1.0,
               dtype=jnp.float32, rngs: nnx.Rngs):
    # PyTorch Conv1d's scale (Zoology's BaseConv); the residual in c keeps x in reach at init.
    self.conv_kernel = params.param(rngs, jax.nn.initializers.normal(conv_size ** -0.5),
                                    (conv_size, width), (None, params.EMBED))
    self.w_gate = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=1),
                               (width, width), (params.EMBED, None))
    self.w_qk = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2, 3)),
                             (width, 2, num_heads, feature_dim),
                             (params.EMBED, None, params.HEADS, params.HEAD_DIM))
    # The window branch's queries and keys, and the values both branches share.
    self.w_window_qkv = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2, 3)),
                                     (width, 3, num_heads, head_dim),
                                     (params.EMBED, None, params.HEADS, params.HEAD_DIM))
    self.w_out = params.param(rngs, params.fan_in_init(out_init_scale, in_axis=(0, 1), out_axis=2),
                              (num_heads, head_dim, width),
                              (params.HEADS, params.HEAD_DIM, params.EMBED))
    self.num_heads, self.head_dim, self.width = num_heads, head_dim, width
    self.key_dim = ops.feature_size("taylor2", feature_dim)
    self.value_dim = head_dim
    self.normalize = True
    self.conv_size, self.window = conv_size, window
    self.rope_theta = float(rope_theta)
    self.impl = impl
    self.chunk_size = chunk_size or None
    self.dtype = dtype

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> caches.BasedState:
    """Zeros of the constant-size state, whatever `max_length`."""
    del max_length
    dtype = dtype or self.dtype
    window = (batch_size, self.window, self.num_heads, self.head_dim)
    linear = super().init_cache(batch_size, 0)
    return caches.BasedState(
        state=linear.state,
        conv=jnp.zeros(short_conv.history_shape(batch_size, self.conv_size, self.width), dtype),
        k=jnp.zeros(window, dtype), v=jnp.zeros(window, dtype), end=linear.end)

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache: caches.BasedState | None = None):
    """Args: x [B, T, D]; positions [B, T] int32 (the window's rotation); segment_ids [B, T]
    (packed documents: every state restarts at each); cache from `init_cache` or a previous
    call. Returns (y [B, T, D], the new cache or None)."""
    caches.refuse_segments_with_cache(cache, segment_ids)
    x = x.astype(self.dtype)
    conv, history = short_conv.causal_conv(
        x, self.conv_kernel.value, segment_ids=segment_ids,
        history=None if cache is None else cache.conv)
    c = x + conv * jnp.einsum("btd,de->bte", x, self.w_gate.value.astype(self.dtype))
    qk = jnp.einsum("btd,dcnf->btcnf", c, self.w_qk.value.astype(self.dtype))
    qkv = jnp.einsum("btd,dcnh->btcnh", c, self.w_window_qkv.value.astype(self.dtype))
    v = qkv[:, :, 2]
    linear_cache = None if cache is None else caches.RecurrentState(cache.state, cache.end)
    o_lin, linear_cache = self._attend(
        ops.taylor2_features(qk[:, :, 0]), ops.taylor2_features(qk[:, :, 1]), v,
        segment_ids=segment_ids, cache=linear_cache)
    inv_freq = rope.rope_inv_freq(self.head_dim, self.rope_theta)
    q_win, k_win = (rope.apply_rope(qkv[:, :, i], positions, inv_freq) for i in (0, 1))
    o_win, cache = self._window_attention(q_win, k_win, v, segment_ids, cache)
    if cache is not None:
      cache = dataclasses.replace(cache, state=linear_cache.state, conv=history,
                                  end=linear_cache.end)
    return self._project_out(o_lin.astype(jnp.float32) + o_win.astype(jnp.float32)), cache

  def _window_attention(self, q, k, v, segment_ids, cache):
    """Softmax over the last W tokens: (out [B, T, N, H], cache with the new window)."""
    if cache is None:
      mask = AttentionMask(causal=True, window=self.window, q_segment_ids=segment_ids,
                           kv_segment_ids=segment_ids)
      return dot_product_attention(q, k, v, mask=mask), None
    # Keys [cached W; new T] are consecutive tokens, so the queries sit at indices W..W+T-1
    # and a causal window-W mask is exact; slots before the first token are masked out.
    batch, t = q.shape[:2]
    keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
    values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
    written = jnp.arange(self.window + t) >= self.window - cache.end
    mask = AttentionMask(causal=True, window=self.window, q_offset=self.window,
                         q_segment_ids=jnp.ones((batch, t), jnp.int32),
                         kv_segment_ids=jnp.broadcast_to(written.astype(jnp.int32),
                                                         (batch, self.window + t)))
    out = dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask=mask)
    cache = dataclasses.replace(cache, k=keys[:, t:], v=values[:, t:])
    return out, cache


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.feature_dim = 16         # F: q and k of the linear branch before the Taylor map (the paper: 16)
  c.conv_size = 3            # K taps of the gated short convolution (the paper: 3)
  c.window = 64              # W tokens of the softmax branch (the paper: 64 to 128)
  c.rope_theta = 10_000.0    # rotary base of the window branch
  c.impl = "auto"            # linear branch: auto | reference | recurrent | chunked | pallas
  c.chunk_size = 0           # chunked forms' C; 0 = the op's default (64)
  return c


def validate(model, c, prefix: str = "model.based") -> None:
  """Raises ConfigError for the first bad field of the section `c` of `model`."""
  if not isinstance(c.feature_dim, int) or not 1 <= c.feature_dim <= MAX_FEATURE_DIM:
    raise ConfigError(f"{prefix}.feature_dim", c.feature_dim,
                      f"must be in 1..{MAX_FEATURE_DIM} (the Taylor state grows as its square; "
                      "the paper: 16)")
  if not isinstance(c.conv_size, int) or not 1 <= c.conv_size <= 16:
    raise ConfigError(f"{prefix}.conv_size", c.conv_size, "must be in 1..16 (a short convolution)")
  if not isinstance(c.window, int) or c.window < 1:
    raise ConfigError(f"{prefix}.window", c.window, "must be an integer >= 1")
  if not (c.rope_theta > 1 and math.isfinite(float(c.rope_theta))):
    raise ConfigError(f"{prefix}.rope_theta", c.rope_theta, "must be finite and > 1")
  if c.impl not in ops.IMPLS:
    raise ConfigError(f"{prefix}.impl", c.impl, "unknown choice", ops.IMPLS)
  if c.chunk_size < 0:
    raise ConfigError(f"{prefix}.chunk_size", c.chunk_size, "must be >= 0 (0 = the default)")
  if dims.head_dim(model) % 2:
    raise ConfigError("model.head_dim", dims.head_dim(model),
                      f"must be even for {prefix}'s rotation (pairs of features)")


def build(model, c, rngs) -> Based:
  return Based(model.width, model.num_heads, dims.head_dim(model), feature_dim=c.feature_dim,
               conv_size=c.conv_size, window=c.window, rope_theta=c.rope_theta, impl=c.impl,
               chunk_size=c.chunk_size, out_init_scale=dims.out_init_scale(model),
               dtype=dims.DTYPES[model.dtype], rngs=rngs)


SPEC = MixerSpec(name="based", section="based", defaults=defaults, validate=validate,
                 build=build, cache_types=(caches.BasedState,))
