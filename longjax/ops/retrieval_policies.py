"""The selection rules of the training-free retrieval policies, on the mechanism of
`longjax.ops.retrieval` (sinks + local window + a selection, InfLLM's positions).

- **InfLLM** (Xiao et al. 2024): the distant cache is cut into blocks ("memory units") of
  `block` tokens. A key's representative score is the sum of the logits the `window` queries
  after it gave it while it sat in their local window (r_m = sum_j q_{m+j} . k_m); when a block
  leaves every window, its `representatives` best-scored keys are frozen as its representative
  keys. A query scores each candidate block by the sum of its (KV head's query heads') dot
  products with the block's representatives, and attends to the `top_k / block` best blocks of
  its KV head. InfLLM shares one selection across a prefill chunk; here every query selects
  for itself, as InfLLM does when decoding, so that a prefill equals token-by-token decoding.
- **TokenSelect** (Wu et al. 2025): every query head scores every candidate token (q . k),
  normalises its scores by a softmax, and the heads vote: the `top_k` tokens with the largest
  summed probability are attended by all heads. The *selection cache*: a query whose cosine
  similarity to the previous query is at least `reuse_threshold` reuses the previous selection.

Shapes: B batch, T queries, N query heads sharing K KV heads, H head dim, S cache slots.
"""

import jax
import jax.numpy as jnp

from kernels_pallas.softmax import softmax
from longjax.ops import retrieval


def accumulate_scores(scores, q, k_cache, q_index, *, window: int, rotate, chunk: int):
  """InfLLM's representative scores: adds q_t . k_m (true positions, summed over each KV head's
  query heads) to key m's score for every query t in `q_index` with t - window < m <= t.

  Args:
    scores: [B, K, S] float32 running sums.
    q: [B, T, N, H] unrotated queries; k_cache: [B, S, K, H] unrotated keys, every index <=
      max(q_index) written.
    q_index: [T] int32 cache indices (= positions) of the queries.

  Returns:
    the updated scores.
  """
  b, t, n, h = q.shape
  s, kv_heads = k_cache.shape[1], k_cache.shape[2]
  chunk = min(chunk, t)
  chunks = -(-t // chunk)
  pad = chunks * chunk - t
  span = min(window + chunk, s)
  qc = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, chunks, chunk, n, h)
  ic = jnp.pad(q_index, (0, pad), constant_values=-1).reshape(chunks, chunk)  # -1: padding

  def one_chunk(scores, args):
    q_chunk, index = args
    positions = jnp.broadcast_to(index, (b, chunk))
    q_sum = rotate(q_chunk, positions, False).reshape(b, chunk, kv_heads, -1, h).sum(axis=3)
    start = jnp.clip(index[0] + 1 - window, 0, s - span)
    key = start + jnp.arange(span)
    k = rotate(jax.lax.dynamic_slice_in_dim(k_cache, start, span, axis=1),
               jnp.broadcast_to(key, (b, span)), True)
    x = jnp.einsum("bckh,bskh->bkcs", q_sum, k, preferred_element_type=jnp.float32)
    band = (key[None, :] <= index[:, None]) & (key[None, :] > index[:, None] - window)
    added = jnp.sum(jnp.where(band, x, 0.0), axis=2)  # [B, K, span]
    current = jax.lax.dynamic_slice_in_dim(scores, start, span, axis=2)
    return jax.lax.dynamic_update_slice_in_dim(scores, current + added, start, axis=2), None

  scores, _ = jax.lax.scan(one_chunk, scores, (qc.transpose(1, 0, 2, 3, 4), ic))
  return scores


def freeze_representatives(rep_keys, scores, k_cache, old_end, new_end, *, window: int,
                           block: int, new_tokens: int):
  """Writes the representative keys of the blocks that left every local window in this call.

  Block g's keys have all their scores once the query window - 1 after its last key has run:
  (g + 1) * block <= end + 1 - window. The blocks complete after `new_end` tokens and not after
  `old_end` get their `representatives` best-scored (unrotated) keys.

  Args:
    rep_keys: [B, K, G, R, H] the blocks' representative keys, G = S // block.
    scores: [B, K, S] from `accumulate_scores`.
    k_cache: [B, S, K, H] unrotated keys.
    old_end, new_end: int32 [], tokens in the cache before and after this call.
    new_tokens: static bound on new_end - old_end (the call's length).

  Returns:
    the updated rep_keys.
  """
  b, kv_heads, g_total, reps, h = rep_keys.shape
  done_before = jnp.maximum(old_end + 1 - window, 0) // block
  done_after = jnp.maximum(new_end + 1 - window, 0) // block
  count = min(new_tokens // block + 1, g_total)
  g = done_before + jnp.arange(count)
  index = jnp.minimum(g, g_total - 1)[:, None] * block + jnp.arange(block)  # [count, block]
  _, best = jax.lax.top_k(scores[:, :, index], reps)  # [B, K, count, R]
  tokens = jnp.take_along_axis(jnp.broadcast_to(index, (b, kv_heads, count, block)), best,
                               axis=-1)
  keys = k_cache[jnp.arange(b)[:, None, None, None], tokens,
                 jnp.arange(kv_heads)[None, :, None, None]]  # [B, K, count, R, H]
  target = jnp.where(g < done_after, g, g_total)  # past the end: dropped
  return rep_keys.at[:, :, target].set(keys.astype(rep_keys.dtype), mode="drop")


def infllm_select(rep_keys, *, top_blocks: int, block: int, sinks: int, window: int):
  """InfLLM's `Select`: the top blocks by representative score per query and KV head."""
  kv_heads, g_total = rep_keys.shape[1], rep_keys.shape[2]
  top_blocks = min(top_blocks, g_total)

  def select(state, q_far, q_index, live):
    del live
    b, c, n, h = q_far.shape
    qg = q_far.reshape(b, c, kv_heads, n // kv_heads, h).sum(axis=3)
    scores = jnp.einsum("bckh,bkgrh->bckg", qg, rep_keys.astype(q_far.dtype),
                        preferred_element_type=jnp.float32)
    candidates = retrieval.local_start(q_index, window, block) // block  # blocks g < this
    g = jnp.arange(g_total)
    usable = (g[None, :] >= sinks // block) & (g[None, :] < candidates[:, None])  # [C, G]
    scores = jnp.where(usable[None, :, None, :], scores, -jnp.inf)
    best, chosen = jax.lax.top_k(scores, top_blocks)  # [B, C, K, k]
    ids = (chosen[..., None] * block + jnp.arange(block)).reshape(b, c, kv_heads, -1)
    valid = jnp.repeat(jnp.isfinite(best), block, axis=-1)
    return (ids.astype(jnp.int32), valid), state

  return select


def tokenselect_select(k_cache, *, top_k: int, sinks: int, window: int,
                       reuse_threshold: float, scale: float):
  """TokenSelect's `Select`, its state the selection cache: (last query [B, N, H] far-rotated,
  last ids [B, top_k] int32 with -1 for none, has_last bool [])."""
  s, kv_heads = k_cache.shape[1], k_cache.shape[2]
  top_k = min(top_k, s)

  def fresh(q_far, q_index):
    b, c, n, h = q_far.shape
    qg = q_far.reshape(b, c, kv_heads, n // kv_heads, h)
    x = jnp.einsum("bckgh,bskh->bckgs", qg, k_cache.astype(q_far.dtype),
                   preferred_element_type=jnp.float32) * scale
    key = jnp.arange(s)
    lo = retrieval.local_start(q_index, window, 1)
    usable = (key[None, :] >= sinks) & (key[None, :] < lo[:, None])  # [C, S]
    p = softmax(jnp.where(usable[None, :, None, None, :], x, -jnp.inf))
    votes = jnp.sum(p, axis=(2, 3))  # [B, C, S]: each head's probabilities, summed
    votes = jnp.where(usable[None], votes, -1.0)
    best, chosen = jax.lax.top_k(votes, top_k)
    return jnp.where(best >= 0, chosen, -1).astype(jnp.int32)  # [B, C, k]

  def select(state, q_far, q_index, live):
    last_q, last_ids, has_last = state
    b, c, n, h = q_far.shape
    flat = q_far.reshape(b, c, n * h).astype(jnp.float32)
    previous = jnp.concatenate([last_q.reshape(b, 1, n * h).astype(jnp.float32), flat[:, :-1]],
                               axis=1)
    cosine = jnp.sum(flat * previous, -1) / jnp.maximum(
        jnp.linalg.norm(flat, axis=-1) * jnp.linalg.norm(previous, axis=-1), 1e-30)
    first_ever = (jnp.arange(c) == 0) & ~has_last
    reuse = (cosine >= reuse_threshold) & ~first_ever[None] & live[None]  # [B, C]
    # Query i uses the selection of the last query j <= i that did not reuse (-1: the cache's).
    source = jax.lax.cummax(jnp.where(reuse, -1, jnp.arange(c)), axis=1)
    ids = fresh(q_far, q_index)
    chosen = jnp.where((source >= 0)[..., None],
                       jnp.take_along_axis(ids, jnp.maximum(source, 0)[..., None], axis=1),
                       last_ids[:, None])
    last = jnp.sum(live) - 1
    state = (flat[:, last].reshape(b, n, h).astype(last_q.dtype), chosen[:, last],
             jnp.asarray(True))
    valid = chosen >= 0
    ids = jnp.broadcast_to(jnp.maximum(chosen, 0)[:, :, None], (b, c, kv_heads, top_k))
    return (ids, jnp.broadcast_to(valid[:, :, None], ids.shape)), state

  return select
