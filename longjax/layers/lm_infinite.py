"""LM-Infinite attention (Han et al. 2023, "LM-Infinite: Zero-Shot Extreme Length
Generalization for Large Language Models"): a Λ-shaped mask plus a distance ceiling.

Each query sees its last `window` keys at their true distances and the first `global_tokens`
keys of the row; a global key further away than the window is treated as if it sat exactly
`ceiling` tokens back (the training length), so no query ever meets an unseen distance. The two
parts are separate softmaxes merged by their log-sum-exp: the local part through
`dot_product_attention` (blockwise, window-skipping), the global part densely (it has only
`global_tokens` keys).

Only the positional encoding's *relative* behaviour is changed: the global part rotates queries
at position `ceiling` and keys at 0 (and evaluates biases there), which gives every such pair the
distance `ceiling` for RoPE, ALiBi and the learned relative biases alike.

Decoding (`lm_infinite_decode`) keeps O(global_tokens + window) keys: the slots of StreamingLLM's
cache (`longjax.layers.streaming`), keys unrotated, plus each slot's true position. Unlike
StreamingLLM, positions are never re-assigned: window keys keep their true positions and far
global keys sit at `ceiling`, so every decode step equals the same token's row of the full pass.
"""

import jax
import jax.numpy as jnp

from longjax import ops
from longjax.layers.caches import RollingCache
from longjax.ops import AttentionMask, dot_product_attention


def lm_infinite_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *,
                          segment_ids: jax.Array | None, window: int, global_tokens: int,
                          ceiling: int, positional, scale_queries, impl: str,
                          block_size: int | None) -> jax.Array:
  """Λ-masked attention with a distance ceiling over a whole sequence (decoding with a cache:
  `lm_infinite_decode`).

  Args:
    q: [B, T, N, H] unrotated queries.
    k, v: [B, T, K, H] unrotated keys, values.
    positions: [B, T] true positions.
    segment_ids: [B, T] packed-document ids or None. Global tokens are the row's first
      `global_tokens` tokens (only the first document of a packed row has them).
    window, global_tokens, ceiling: see the module docstring.
    positional: the layer's `AttentionPositions`.
    scale_queries: (q, positions) -> q after rotation (log-n scaling), with true positions.
    impl, block_size: for the local part.

  Returns:
    [B, T, N, H] in q.dtype.
  """
  batch, length = positions.shape
  # Local part: true positions, sliding window.
  q_local = scale_queries(positional.rotate(q, positions), positions)
  k_local = positional.rotate(k, positions, is_key=True)
  mask = AttentionMask(causal=True, window=window, q_segment_ids=segment_ids,
                       kv_segment_ids=segment_ids)
  out_local, lse_local = dot_product_attention(
      q_local, k_local, v, mask=mask, bias=positional.bias(positions, positions), impl=impl,
      block_size=block_size, return_lse=True)

  # Global part: the row's first g tokens, for the queries they are outside the window of.
  g = min(global_tokens, length)
  index = jnp.arange(length)
  visible = (index[:, None] - jnp.arange(g)[None, :]) >= window  # outside the local window
  visible = jnp.broadcast_to(visible[None, None], (batch, 1, length, g))
  if segment_ids is not None:
    visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :g])
  out_far, lse_far = _far_global_part(q, k[:, :g], v[:, :g], positions, visible,
                                      ceiling=ceiling, positional=positional,
                                      scale_queries=scale_queries)
  return _merge(out_local, lse_local, out_far, lse_far).astype(q.dtype)


def _far_global_part(q: jax.Array, k_global: jax.Array, v_global: jax.Array,
                     positions: jax.Array, visible: jax.Array, *, ceiling: int, positional,
                     scale_queries) -> tuple[jax.Array, jax.Array]:
  """Attention to the global keys outside the window, every one at distance `ceiling`.

  Dense: there are only G = global_tokens keys. Shared by the full pass and the decode step.

  Args:
    q: [B, T, N, H] unrotated queries.
    k_global, v_global: [B, G, K, H] unrotated keys and values of the global tokens.
    positions: [B, T] true query positions (only `scale_queries` reads them).
    visible: [B, 1, T, G] bool, which global keys each query attends to at the ceiling.
    ceiling, positional, scale_queries: as for `lm_infinite_attention`.

  Returns:
    (out [B, T, N, H] float32, lse [B, N, T] float32; -inf where no global key is visible).
  """
  batch, length, _, head_dim = q.shape
  g = k_global.shape[1]
  # Query at `ceiling` and key at 0: the distance `ceiling` for rotations and biases alike.
  q_positions = jnp.full_like(positions, ceiling)
  kv_positions = jnp.zeros((batch, g), jnp.int32)
  q_far = scale_queries(positional.rotate(q, q_positions), positions)
  k_far = positional.rotate(k_global, kv_positions, is_key=True)
  logits = ops.grouped_logits(q_far, k_far) * head_dim**-0.5
  bias = positional.bias(q_positions, kv_positions)
  if bias is not None:
    logits = logits + bias.block(0, length, 0, g)
  # Values in float32: the probabilities are not rounded to the cache's dtype.
  return ops.masked_softmax_attention(logits, visible, v_global.astype(jnp.float32))


def _merge(out_local: jax.Array, lse_local: jax.Array, out_far: jax.Array,
           lse_far: jax.Array) -> jax.Array:
  """One softmax from the two parts' (out [B, T, N, H], lse [B, N, T]): [B, T, N, H] float32.

  A -inf lse_far (no global key outside the window) gives the global part weight 0.
  """
  return ops.merge_attention([(out_local, lse_local), (out_far, lse_far)])[0]


def init_lm_infinite_cache(batch_size: int, global_tokens: int, window: int, num_kv_heads: int,
                           head_dim: int, dtype) -> RollingCache:
  """An empty `RollingCache` of C = g + window slots; LM-Infinite records each slot's true
  position in its `positions`."""
  return RollingCache.empty(batch_size, global_tokens + window, num_kv_heads, head_dim, dtype)


def lm_infinite_decode(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
                       cache: RollingCache, *, window: int, global_tokens: int, ceiling: int,
                       positional, scale_queries, impl: str, block_size: int | None
                       ) -> tuple[jax.Array, RollingCache]:
  """LM-Infinite attention of T new tokens through the O(g + window) cache, one at a time.

  Each step sees exactly what `lm_infinite_attention` gives the same token in a full pass: the
  keys of the last `window` tokens (by token index) at their true positions, and the first g
  tokens, once outside the window, at distance `ceiling`. The cache slots are StreamingLLM's
  (g fixed slots, then a ring of `window`), but no position is re-assigned.

  Args:
    q: [B, T, N, H] unrotated queries of the new tokens.
    k, v: [B, T, K, H] unrotated keys and values.
    positions: [B, T] true positions of the new tokens (queries and, once cached, keys).
    cache: from `init_lm_infinite_cache`.
    window, global_tokens, ceiling, positional, scale_queries, impl, block_size: as for
      `lm_infinite_attention`.

  Returns:
    (out [B, T, N, H] in q.dtype, updated cache).
  """
  batch = q.shape[0]
  g = global_tokens
  capacity = cache.k.shape[1]

  def one_token(cache, inputs):
    q_t, k_t, v_t, p_t = (a[:, None] for a in inputs)  # [B, 1, ., H] and positions [B, 1]
    t = cache.end  # token index of this step
    slot = jnp.where(t < capacity, t, g + (t - g) % window)
    keys = jax.lax.dynamic_update_slice(cache.k, k_t.astype(cache.k.dtype), (0, slot, 0, 0))
    values = jax.lax.dynamic_update_slice(cache.v, v_t.astype(cache.v.dtype), (0, slot, 0, 0))
    token_index = cache.token_index.at[slot].set(t)
    kv_positions = jax.lax.dynamic_update_slice(cache.positions, p_t.astype(jnp.int32), (0, slot))
    valid = token_index >= 0
    # Local part: the window by token index (the ring holds only tokens inside it; a global
    # slot counts while its token is), keys at their recorded positions.
    near = valid & (t - token_index < window)
    q_local = scale_queries(positional.rotate(q_t, p_t), p_t)
    k_local = positional.rotate(keys.astype(q.dtype), kv_positions, is_key=True)
    mask = AttentionMask(causal=False, q_segment_ids=jnp.ones((batch, 1), jnp.int32),
                         kv_segment_ids=jnp.broadcast_to(near.astype(jnp.int32),
                                                         (batch, capacity)))
    out_local, lse_local = dot_product_attention(
        q_local, k_local, values.astype(q.dtype), mask=mask,
        bias=positional.bias(p_t, kv_positions), impl=impl, block_size=block_size,
        return_lse=True)
    # Global part: the g fixed slots whose token has left the window.
    far = valid[:g] & (t - token_index[:g] >= window)
    out_far, lse_far = _far_global_part(
        q_t, keys[:, :g].astype(q.dtype), values[:, :g], p_t,
        jnp.broadcast_to(far[None, None, None], (batch, 1, 1, g)), ceiling=ceiling,
        positional=positional, scale_queries=scale_queries)
    out = _merge(out_local, lse_local, out_far, lse_far).astype(q.dtype)
    new_cache = RollingCache(k=keys, v=values, token_index=token_index, positions=kv_positions,
                             end=t + 1)
    return new_cache, out[:, 0]

  moved = tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, positions))  # scan over T
  cache, outs = jax.lax.scan(one_token, cache, moved)
  return jnp.moveaxis(outs, 0, 1), cache
