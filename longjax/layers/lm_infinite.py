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
"""

import jax
import jax.numpy as jnp

from longjax.ops import AttentionMask, dot_product_attention


def lm_infinite_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *,
                          segment_ids: jax.Array | None, window: int, global_tokens: int,
                          ceiling: int, positional, scale_queries, impl: str,
                          block_size: int | None) -> jax.Array:
  """Λ-masked attention with a distance ceiling; no KV cache.

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
  batch, length, num_heads, head_dim = q.shape
  kv_heads = k.shape[2]
  # Local part: true positions, sliding window.
  q_local = scale_queries(positional.rotate(q, positions), positions)
  k_local = positional.rotate(k, positions)
  mask = AttentionMask(causal=True, window=window, q_segment_ids=segment_ids,
                       kv_segment_ids=segment_ids)
  out_local, lse_local = dot_product_attention(
      q_local, k_local, v, mask=mask, bias=positional.bias(positions, positions), impl=impl,
      block_size=block_size, return_lse=True)

  # Global part: every visible global key at distance `ceiling`.
  g = min(global_tokens, length)
  q_far = scale_queries(positional.rotate(q, jnp.full_like(positions, ceiling)), positions)
  k_far = positional.rotate(k[:, :g], jnp.zeros((batch, g), jnp.int32))
  logits = jnp.einsum("btkgh,bskh->bkgts",
                      q_far.reshape(batch, length, kv_heads, num_heads // kv_heads, head_dim),
                      k_far, preferred_element_type=jnp.float32) * head_dim**-0.5
  logits = logits.reshape(batch, num_heads, length, g)
  bias = positional.bias(jnp.full_like(positions, ceiling), jnp.zeros((batch, g), jnp.int32))
  if bias is not None:
    logits = logits + bias.block(0, length, 0, g)
  index = jnp.arange(length)
  visible = (index[:, None] - jnp.arange(g)[None, :]) >= window  # outside the local window
  visible = jnp.broadcast_to(visible[None, None], (batch, 1, length, g))
  if segment_ids is not None:
    visible = visible & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :g])
  logits = jnp.where(visible, logits, -jnp.inf)
  lse_far = jax.nn.logsumexp(logits, axis=-1)  # [B, N, T]; -inf where no global key is far
  probs = jnp.where(visible, jnp.exp(logits - jnp.where(jnp.isfinite(lse_far), lse_far,
                                                        0.0)[..., None]), 0.0)
  out_far = jnp.einsum("bkgts,bskh->btkgh",
                       probs.reshape(batch, kv_heads, num_heads // kv_heads, length, g),
                       v[:, :g].astype(jnp.float32)).reshape(batch, length, num_heads, head_dim)

  # Merge the two softmaxes: weights exp(lse_part - lse_total).
  lse = jnp.logaddexp(lse_local, lse_far)
  w_local = jnp.exp(lse_local - lse).transpose(0, 2, 1)[..., None]  # [B, T, N, 1]
  w_far = jnp.exp(lse_far - lse).transpose(0, 2, 1)[..., None]
  out = out_local.astype(jnp.float32) * w_local + out_far * w_far
  return out.astype(q.dtype)
