"""Softmax attention mixer: multi-head and grouped-query attention with a KV cache.

All mixers share one interface (see docs/design.md):

    y, cache = mixer(x, positions=positions, segment_ids=segment_ids, cache=None)  # train
    y, cache = mixer(x_t, positions=pos_t, cache=cache)                              # decode
    cache = mixer.init_cache(batch_size, max_length, dtype)

The maths is `longjax.ops.dot_product_attention` (or, with normalizer="softplus",
`longjax.ops.softplus_attention`); this module owns the projections, applies the positional
encoding and reads/writes the cache.
"""

from flax import nnx
import jax
import jax.numpy as jnp

from longjax.layers import lm_infinite
from longjax.layers import params
from longjax.layers import retrieval
from longjax.layers.retrieval_config import RetrievalPolicy
from longjax.layers import streaming
from longjax.layers.caches import KVCache
from longjax.layers.caches import refuse_segments_with_cache
from longjax.layers.positional_base import AttentionPositions
from longjax.ops import AttentionMask, add_learned_sink, dot_product_attention
from longjax.ops import softplus_attention

# How a row of logits becomes weights: softmax, or softplus + l1 normalisation (LSSA).
NORMALIZERS = ("softmax", "softplus")


def log_scale_queries(q: jax.Array, positions: jax.Array, train_length: int) -> jax.Array:
  """Log-length scaled attention: logits of the query at position p times log_L(p + 1).

  The factor max(1, log(p + 1) / log(L)) keeps the softmax's entropy from growing with the
  number of visible tokens beyond the training length L (Chiang & Cholak 2022; the clipped form
  used for training-free extension, e.g. Qwen's "logn" attention). It is exactly 1 up to the
  training length, so the trained model is unchanged there.

  Args:
    q: [B, T, N, H] queries.
    positions: [B, T] positions; p + 1 tokens are visible to the query at p.
    train_length: L >= 2.

  Returns:
    [B, T, N, H] in q.dtype.
  """
  factor = jnp.maximum(1.0, jnp.log(positions.astype(jnp.float32) + 1.0) / jnp.log(train_length))
  return (q.astype(jnp.float32) * factor[:, :, None, None]).astype(q.dtype)


def projection_params(rngs: nnx.Rngs, width: int, num_heads: int, num_kv_heads: int,
                      head_dim: int, out_init_scale: float = 1.0):
  """The projections of a softmax-attention layer (also landmark attention's): w_q [D, N, H],
  w_kv [D, 2, K, H] (keys and values in one matrix: one matmul instead of two) and
  w_out [N, H, D], with their logical axes."""
  w_q = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2)),
                     (width, num_heads, head_dim), (params.EMBED, params.HEADS, params.HEAD_DIM))
  w_kv = params.param(rngs, params.fan_in_init(in_axis=0, out_axis=(1, 2, 3)),
                      (width, 2, num_kv_heads, head_dim),
                      (params.EMBED, None, params.KV_HEADS, params.HEAD_DIM))
  w_out = params.param(rngs, params.fan_in_init(out_init_scale, in_axis=(0, 1), out_axis=2),
                       (num_heads, head_dim, width), (params.HEADS, params.HEAD_DIM, params.EMBED))
  return w_q, w_kv, w_out


def project_qkv(x: jax.Array, w_q, w_kv, dtype):
  """x [B, T, D] -> (q [B, T, N, H], k [B, T, K, H], v [B, T, K, H]) in `dtype`."""
  x = x.astype(dtype)
  q = jnp.einsum("btd,dnh->btnh", x, w_q.value.astype(dtype))
  kv = jnp.einsum("btd,dckh->btckh", x, w_kv.value.astype(dtype))
  return q, kv[:, :, 0], kv[:, :, 1]


class Attention(nnx.Module):
  """Causal self-attention with N query heads sharing K key/value heads (GQA; MHA when N == K).

  Shapes: x [B, T, D]; projections to [B, T, N, H] (queries) and [B, T, K, H] (keys, values).
  The KV cache holds keys already rotated by their positions, so decoding never re-rotates.
  The arguments' rules (a window for sinks, softmax for a learned sink, ...) are checked once,
  on the config, by `longjax.layers.attention_config.validate`; the model builds this module
  through that spec.
  """

  def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               positional: AttentionPositions, impl: str = "auto", block_size: int = 0,
               log_scaling_length: int = 0, window: int = 0, sink_tokens: int = 0,
               distance_ceiling: int = 0, normalizer: str = "softmax",
               softplus_length_scale: bool = True, reweight_power: float = 0.0,
               learned_sink: bool = False,
               retrieval_policy: RetrievalPolicy | None = None,
               out_init_scale: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
    self.w_q, self.w_kv, self.w_out = projection_params(
        rngs, width, num_heads, num_kv_heads, head_dim, out_init_scale)
    self.positional = positional
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.impl = impl
    self.block_size = block_size or None
    self.log_scaling_length = log_scaling_length
    self.window = window or None  # sliding window: the query at i sees keys i - window < j <= i
    # With a window, the first `sink_tokens` keys stay visible to every query (StreamingLLM's
    # attention sinks; the Λ-shaped mask of LM-Infinite), and decoding uses the O(sinks + window)
    # streaming cache of `longjax.layers.streaming` (with a distance ceiling, LM-Infinite's
    # variant of it in `longjax.layers.lm_infinite`).
    self.sink_tokens = sink_tokens
    # LM-Infinite: global keys beyond the window count as `distance_ceiling` tokens away.
    self.distance_ceiling = distance_ceiling
    # StreamingLLM's learnable sink token, as one learned key/value per layer and KV head
    # (`longjax.ops.learned_sink`). Zeros at init: the sink logit is 0 and its value 0, i.e. the
    # softmax starts with one extra unit in its denominator.
    self.learned_sink = learned_sink
    if learned_sink:
      self.sink_kv = params.param(rngs, jax.nn.initializers.zeros, (2, num_kv_heads, head_dim),
                                  (None, params.KV_HEADS, params.HEAD_DIM))
    # Softplus attention (Gao & Spratling, arXiv 2501.13428): LSSA with `softplus_length_scale`
    # (cosine logits times log(H) log(N), N the keys the query sees), re-weighted (LSSAR) with
    # power p = `reweight_power` > 0. See `longjax.ops.softplus_attention`.
    self.normalizer = normalizer
    self.softplus_length_scale = softplus_length_scale
    self.reweight_power = reweight_power
    # A training-free retrieval policy (InfLLM, TokenSelect, HiP, DuoAttention) for decoding
    # from a cache; None attends to the whole cache (`longjax.layers.retrieval`).
    self.retrieval_policy = retrieval_policy
    self.num_heads = num_heads
    self.dtype = dtype

  def init_cache(self, batch_size: int, max_length: int, dtype=None):
    """An empty cache for `max_length` tokens: a `KVCache`, or with sinks a `RollingCache` of
    sinks + window slots whatever `max_length` (`longjax.layers.caches`)."""
    dtype = dtype or self.dtype
    if self.retrieval_policy is not None:
      return retrieval.init_cache(self.retrieval_policy, batch_size, max_length, self.num_heads,
                                  self.num_kv_heads, self.head_dim, dtype)
    if self.distance_ceiling:
      return lm_infinite.init_lm_infinite_cache(batch_size, self.sink_tokens, self.window,
                                                self.num_kv_heads, self.head_dim, dtype)
    if self.sink_tokens:
      return streaming.init_streaming_cache(batch_size, self.sink_tokens, self.window,
                                            self.num_kv_heads, self.head_dim, dtype)
    return KVCache.empty(batch_size, max_length, self.num_kv_heads, self.head_dim, dtype)

  def layer_cache(self, cache, layer: int):
    """The cache of model layer `layer` from `init_cache`'s: DuoAttention keeps whole only
    that layer's retrieval heads (`longjax.layers.retrieval.for_layer`)."""
    if self.retrieval_policy is None:
      return cache
    return retrieval.for_layer(self.retrieval_policy, cache, layer)

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache=None):
    """Args: x [B, T, D]; positions [B, T] int32; segment_ids [B, T] int32 (packed documents,
    training only); cache from `init_cache` or a previous call. Returns (y [B, T, D], cache)."""
    q, k, v = project_qkv(x, self.w_q, self.w_kv, self.dtype)
    if cache is not None and self.retrieval_policy is not None:
      refuse_segments_with_cache(cache, segment_ids)
      out, cache = retrieval.retrieval_decode(
          q, k, v, cache, self.retrieval_policy, rotate=self._rotate,
          scale_queries=self._scale_queries if self.log_scaling_length else None,
          impl=self.impl, dtype=self.dtype)
      return self._project_out(out), cache
    if cache is not None and self.distance_ceiling:
      refuse_segments_with_cache(cache, segment_ids)
      # Checked before the streaming cache: same slots, but LM-Infinite's true positions.
      out, cache = lm_infinite.lm_infinite_decode(
          q, k, v, positions, cache, window=self.window, global_tokens=self.sink_tokens,
          ceiling=self.distance_ceiling, positional=self.positional,
          scale_queries=self._scale_queries, impl=self.impl, block_size=self.block_size)
      return self._project_out(out), cache
    if cache is not None and self.sink_tokens:
      out, cache = streaming.streaming_attention(
          q, k, v, cache, sinks=self.sink_tokens, window=self.window,
          positional=self.positional, scale_queries=self._scale_queries, impl=self.impl,
          block_size=self.block_size, learned_sink=self._learned_sink())
      return self._project_out(out), cache
    if self.distance_ceiling:
      out = lm_infinite.lm_infinite_attention(
          q, k, v, positions, segment_ids=segment_ids, window=self.window,
          global_tokens=self.sink_tokens, ceiling=self.distance_ceiling,
          positional=self.positional, scale_queries=self._scale_queries, impl=self.impl,
          block_size=self.block_size)
      return self._project_out(out), None
    # Length-dependent encodings (dynamic NTK) are computed for the cache's capacity when
    # decoding, so that keys cached at earlier steps and these queries share one rotation.
    context_length = None if cache is None else cache.k.shape[1]
    q = self.positional.rotate(q, positions, context_length=context_length)
    k = self.positional.rotate(k, positions, context_length=context_length, is_key=True)
    q = self._scale_queries(q, positions)

    if cache is None:
      sinks = {"global_tokens": self.sink_tokens} if self.sink_tokens else {}
      mask = AttentionMask(causal=True, window=self.window, q_segment_ids=segment_ids,
                           kv_segment_ids=segment_ids, **sinks)
      kv_positions = positions
    else:
      refuse_segments_with_cache(cache, segment_ids)
      end = cache.end
      k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, end, 0, 0))
      v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, end, 0, 0))
      kv_positions = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32),
                                                  (0, end))
      cache = KVCache(k=k, v=v, positions=kv_positions, end=end + x.shape[1])
      # Queries sit at cache indices end..end+T-1; causal masking by index also hides the
      # unwritten tail of the cache.
      mask = AttentionMask(causal=True, window=self.window, q_offset=end)
    bias = self.positional.bias(positions, kv_positions)
    if self.normalizer == "softplus":
      # N_t of the length scale and the re-weighting is counted from the mask: the query's
      # cache index + 1 when decoding, as in a prefill; min(position + 1, window) with a window.
      out = softplus_attention(q, k.astype(self.dtype), v.astype(self.dtype), mask=mask,
                               bias=bias, length_scale=self.softplus_length_scale,
                               reweight_power=self.reweight_power, impl=self.impl,
                               block_size=self.block_size)
    elif self.learned_sink:
      out, lse = dot_product_attention(q, k.astype(self.dtype), v.astype(self.dtype), mask=mask,
                                       bias=bias, impl=self.impl, block_size=self.block_size,
                                       return_lse=True)
      out = add_learned_sink(out, lse, q, *self._learned_sink())
    else:
      out = dot_product_attention(q, k.astype(self.dtype), v.astype(self.dtype), mask=mask,
                                  bias=bias, impl=self.impl, block_size=self.block_size)
    return self._project_out(out), cache

  def _rotate(self, x, positions, is_key):
    return self.positional.rotate(x, positions, is_key=is_key)

  def _learned_sink(self):
    """(k_sink, v_sink), each [K, H], or None."""
    if not self.learned_sink:
      return None
    return self.sink_kv.value[0], self.sink_kv.value[1]

  def _scale_queries(self, q, positions):
    if self.log_scaling_length:
      return log_scale_queries(q, positions, self.log_scaling_length)
    return q

  def _project_out(self, out):
    return jnp.einsum("btnh,nhd->btd", out, self.w_out.value.astype(self.dtype))
