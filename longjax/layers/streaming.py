"""StreamingLLM decoding (Xiao et al. 2024, "Efficient Streaming Language Models with Attention
Sinks"): a KV cache holding the first `sinks` tokens plus a rolling window of the last `window`.

Positions are re-assigned inside the cache, as in the paper: keys are cached *before* rotation
and, at every step, the cached tokens get positions 0..n-1 in order of age (sinks first) and the
current query position n-1. Relative distances to window keys are therefore the true ones; the
sinks look as if they sat just before the window. Memory is O(sinks + window) however long the
stream.

Tokens are processed one at a time (a `lax.scan` over the chunk), so a prompt longer than the
cache sees exactly what it would see token by token.
"""

import dataclasses

import jax
import jax.numpy as jnp

from longjax.layers.caches import RollingCache
from longjax.ops import AttentionMask, add_learned_sink, dot_product_attention


def init_streaming_cache(batch_size: int, sinks: int, window: int, num_kv_heads: int,
                         head_dim: int, dtype) -> RollingCache:
  """An empty `RollingCache` of C = sinks + window slots (keys stored unrotated)."""
  return RollingCache.empty(batch_size, sinks + window, num_kv_heads, head_dim, dtype)


def streaming_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache: RollingCache, *,
                        sinks: int, window: int, positional, scale_queries, impl: str,
                        block_size: int | None,
                        learned_sink: tuple[jax.Array, jax.Array] | None = None
                        ) -> tuple[jax.Array, RollingCache]:
  """Attends T new tokens, one at a time, through the sink + rolling-window cache.

  Args:
    q: [B, T, N, H] unrotated queries of the new tokens.
    k, v: [B, T, K, H] unrotated keys and values.
    cache: from `init_streaming_cache`.
    sinks, window: the cache layout.
    positional: the layer's `AttentionPositions` (rotation and bias from re-assigned positions).
    scale_queries: function (q [B, 1, N, H], positions [B, 1]) -> q, applied after rotation.
    impl, block_size: passed to `dot_product_attention`.
    learned_sink: (k_sink, v_sink) [K, H] of `longjax.ops.add_learned_sink`, or None.

  Returns:
    (out [B, T, N, H], updated cache).
  """
  batch = q.shape[0]

  def one_token(cache, qkv):
    q_t, k_t, v_t = (a[:, None] for a in qkv)  # [B, 1, ., H]
    t = cache.end
    slot = jnp.where(t < sinks + window, t, sinks + (t - sinks) % window)
    keys = jax.lax.dynamic_update_slice(cache.k, k_t.astype(cache.k.dtype), (0, slot, 0, 0))
    values = jax.lax.dynamic_update_slice(cache.v, v_t.astype(cache.v.dtype), (0, slot, 0, 0))
    token_index = cache.token_index.at[slot].set(t)
    valid = token_index >= 0
    # Position = age rank among cached tokens: sinks 0..sinks-1, then the window oldest first.
    older = valid[None, :] & (token_index[None, :] < token_index[:, None])
    kv_positions = jnp.broadcast_to(jnp.sum(older, axis=1).astype(jnp.int32), (batch, len(valid)))
    q_positions = jnp.full((batch, 1), jnp.sum(valid) - 1, jnp.int32)
    q_rot = scale_queries(positional.rotate(q_t, q_positions), q_positions)
    k_rot = positional.rotate(keys.astype(q.dtype), kv_positions, is_key=True)
    mask = AttentionMask(causal=False, q_segment_ids=jnp.ones((batch, 1), jnp.int32),
                         kv_segment_ids=jnp.broadcast_to(valid.astype(jnp.int32),
                                                         (batch, len(valid))))
    out, lse = dot_product_attention(q_rot, k_rot, values.astype(q.dtype), mask=mask,
                                     bias=positional.bias(q_positions, kv_positions), impl=impl,
                                     block_size=block_size, return_lse=True)
    if learned_sink is not None:
      out = add_learned_sink(out, lse, q_rot, *learned_sink)
    new_cache = dataclasses.replace(cache, k=keys, v=values, token_index=token_index, end=t + 1)
    return new_cache, out[:, 0]

  moved = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v))  # scan over T
  cache, outs = jax.lax.scan(one_token, cache, moved)
  return jnp.moveaxis(outs, 0, 1), cache
