"""Retrieval attention over a long KV cache: the one mechanism under the training-free policies
(InfLLM, TokenSelect, HiP: `longjax.ops.retrieval_policies`; DuoAttention's heads:
`longjax.layers.retrieval`).

Every policy keeps the whole cache. Query t attends to two parts, merged exactly by their
log-sum-exp (`merge_attention`):

- **local**: its last `window` tokens, t - window < j <= t, at their true distances;
- **far**: the first `sinks` tokens (the "initial tokens" of StreamingLLM and InfLLM), the
  *remainder* (tokens that left the window but whose block is not complete yet: a block policy
  retrieves whole blocks of `align` tokens, InfLLM's "global remainder"), and the `M` tokens
  the policy selects among the complete blocks before the window. Every far key sits `window`
  tokens before the query (InfLLM's positions, for every policy alike, so that policies differ
  only in what they select): no distance beyond `window` is ever seen.

The selection is one set of tokens per query shared by the layer's heads, as in InfLLM's and
TokenSelect's code (scores summed over heads), so that a gather reads whole [K, H] rows (2304
rows of a 64k cache: 0.7 ms; from a head-major [B, K, S, H] layout, 256-byte pieces, 4 ms).

Keys are cached unrotated. Far keys are used as they are: the query is
rotated at `window` and then by the key's rotation at 0 (`far_queries`), which for every
rotary encoding here is a per-feature scale (1 for RoPE and xPos, YaRN's attention factor) and
so moves from the key onto the query. The local part reads a ring of the last `window` keys,
rotated once when written, so that a decode step rotates one key, not `window`.

Shapes: B batch, C queries of a chunk, N query heads sharing K KV heads, H head dim, S cache
slots, W window.
"""

from collections.abc import Callable

import jax
from jax.experimental.compute_on import compute_on
import jax.numpy as jnp

from kernels_pallas.softmax import grouped_logits
from kernels_pallas.softmax import masked_softmax_attention
from longjax.ops.attention import dot_product_attention
from longjax.ops.masks import AttentionMask


def complete_blocks_before_window(q_index, window: int, align: int):
  """Tokens of the complete `align`-blocks entirely before each query's window: [C] int32.

  Blocks g with (g + 1) * align <= q_index + 1 - window are the candidates; the tokens from
  this bound up to the window's start are the remainder."""
  return jnp.maximum(q_index + 1 - window, 0) // align * align


def candidate_blocks(q_index, *, block: int, sinks: int, window: int):
  """The blocks a block policy may select for each query: g in [first, end), where `first`
  (int) is the first block past the sinks and `end` ([C] int32) the first one reaching into
  the query's window."""
  return -(-sinks // block), complete_blocks_before_window(q_index, window, block) // block


def kv_head_sums(q, kv_heads: int):
  """q [B, C, N, H] summed over each KV head's query heads: [B, C, K, H] (scores summed over
  heads, as the policies rank by)."""
  b, c, n, h = q.shape
  return q.reshape(b, c, kv_heads, n // kv_heads, h).sum(axis=3)


def far_queries(q, window: int, rotate: Callable):
  """Queries [B, C, N, H] rotated to score unrotated keys at distance `window`."""
  b, c = q.shape[:2]
  at_window = rotate(q, jnp.full((b, c), window, jnp.int32), False)
  return rotate(at_window, jnp.zeros((b, c), jnp.int32), True)


def ring_tokens(first, window: int):
  """The token each slot of a ring of `window` slots holds before the token `first`: [W] int32,
  the latest i < first with i % window == slot (negative: empty)."""
  slot = jnp.arange(window)
  return first - 1 - (first - 1 - slot) % window


def local_attention(q, ring_k, ring_v, new_k, new_v, q_index, *, window: int, impl: str):
  """Attention of a chunk of queries to their last `window` tokens, at true positions.

  Args:
    q: [B, C, N, H] queries rotated at their positions (log-n scaled if any).
    ring_k, ring_v: [B, W, K, H] the keys (rotated) and values of the W tokens before the
      chunk, token i in slot i % W (`ring_tokens`); for a one-query chunk (a decode step),
      already holding the query's own key, so that the ring is exactly its window.
    new_k, new_v: [B, C, K, H] the chunk's own keys (rotated) and values (unused when C = 1).
    q_index: [C] int32 consecutive positions of the queries.
    impl: `dot_product_attention`'s implementation for a one-query chunk (a decode step).

  Returns:
    (out [B, C, N, H] float32, lse [B, N, C] float32).
  """
  b, c = q.shape[:2]
  if c == 1:  # a decode step: the ring is the window (the fused kernels' decode path)
    valid = (ring_tokens(q_index[0] + 1, window) >= 0).astype(jnp.int32)
    mask = AttentionMask(causal=False, q_segment_ids=jnp.ones((b, 1), jnp.int32),
                         kv_segment_ids=jnp.broadcast_to(valid, (b, window)))
    return dot_product_attention(q, ring_k.astype(q.dtype), ring_v.astype(q.dtype), mask=mask,
                                 impl=impl, return_lse=True)
  keys = jnp.concatenate([ring_k.astype(q.dtype), new_k.astype(q.dtype)], axis=1)
  values = jnp.concatenate([ring_v.astype(q.dtype), new_v.astype(q.dtype)], axis=1)
  token = jnp.concatenate([ring_tokens(q_index[0], window), q_index])
  visible = ((token[None, :] > q_index[:, None] - window) & (token[None, :] <= q_index[:, None])
             & (token[None, :] >= 0))
  logits = grouped_logits(q, keys) * q.shape[-1] ** -0.5
  return masked_softmax_attention(logits, visible[None, None], values)


def gather_runs(cache, starts, run: int):
  """Runs of `run` consecutive rows: cache [B, S, K, H], starts [B, C, P] -> [B, C, P * run,
  K, H]. One slice per run rather than one gather per row: a block policy's 16 blocks of 128
  rows of a 64k cache in 0.1 ms, where 2048 single rows take 0.7."""
  b, s = cache.shape[:2]
  starts = jnp.clip(starts, 0, s - run)

  def one_row(cache_row, starts_row):  # [S, K, H], [C, P]
    take = lambda start: jax.lax.dynamic_slice_in_dim(cache_row, start, run, axis=0)
    return jax.vmap(jax.vmap(take))(starts_row)  # [C, P, run, K, H]

  rows = jax.vmap(one_row)(cache, starts)
  return rows.reshape(b, starts.shape[1], -1, *cache.shape[2:])


def host_gather_runs(cache, starts, run: int):
  """`gather_runs` of a cache in host memory: the rows are gathered on the host and only they
  are copied to the device (`jax.experimental.compute_on`). The row indices are built on the
  device and moved over, since host code may hold no device constants."""
  b, s = cache.shape[:2]
  rows = jnp.clip(starts, 0, s - run)[..., None] + jnp.arange(run)  # [B, C, P, run]
  rows = (rows + s * jnp.arange(b)[:, None, None, None]).reshape(-1, 1)
  numbers = jax.lax.GatherDimensionNumbers(offset_dims=(1, 2), collapsed_slice_dims=(0,),
                                           start_index_map=(0,))

  @compute_on("device_host")
  @jax.jit
  def on_host(cache, rows):
    flat = cache.reshape(b * s, *cache.shape[2:])
    return jax.lax.gather(flat, rows, numbers, (1, *cache.shape[2:]),
                          mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS)

  out = on_host(cache, jax.device_put(rows, jax.memory.Space.Host))
  out = jax.device_put(out, jax.memory.Space.Device)
  return out.reshape(b, starts.shape[1], -1, *cache.shape[2:])


def host_write(cache, new, end):
  """cache [B, S, ...] in host memory with `new` [B, T, ...] written at `end`, on the host."""
  @compute_on("device_host")
  @jax.jit
  def on_host(cache, new, end):
    return jax.lax.dynamic_update_slice_in_dim(cache, new, end, axis=1)

  return on_host(cache, jax.device_put(new.astype(cache.dtype), jax.memory.Space.Host), end)


def far_attention(q_far, parts, *, impl: str):
  """Attention of each query to its own far keys, all at distance `window`.

  Args:
    q_far: [B, C, N, H] from `far_queries` (log-n scaled if any).
    parts: the far keys as (k_rows, v_rows [B, C, F, K, H] unrotated, valid [B, C, F] bool)
      triples (sinks, remainder, selection), read with `gather_runs` or `host_gather_runs`.
    impl: `dot_product_attention`'s implementation.

  Returns:
    (out [B, C, N, H] float32, lse [B, N, C] float32); -inf where no far key is valid.
  """
  b, c, n, h = q_far.shape
  valid = jnp.concatenate([ok for _, _, ok in parts], axis=-1)
  f = valid.shape[-1]
  flat = lambda i: jnp.concatenate([part[i] for part in parts], axis=2).reshape(
      b * c, f, *parts[0][i].shape[3:]).astype(q_far.dtype)
  mask = AttentionMask(causal=False, q_segment_ids=jnp.ones((b * c, 1), jnp.int32),
                       kv_segment_ids=valid.reshape(b * c, f).astype(jnp.int32))
  out, lse = dot_product_attention(q_far.reshape(b * c, 1, n, h), flat(0), flat(1), mask=mask,
                                   impl=impl, return_lse=True)
  # A row without any valid key: weight 0 in the merge, whatever the implementation returned.
  seen = jnp.any(valid, -1).reshape(b * c, 1, 1)
  lse = jnp.where(seen, lse.transpose(0, 2, 1), -jnp.inf)
  out = jnp.where(seen[..., None], out, 0.0)
  return out.reshape(b, c, n, h), lse.reshape(b, c, n).transpose(0, 2, 1)
