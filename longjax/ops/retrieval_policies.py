"""The selection rules of the training-free retrieval policies, on the mechanism of
`longjax.ops.retrieval` (local window + far keys at distance `window`).

- **InfLLM** (Xiao et al. 2024, "InfLLM: Training-Free Long-Context Extrapolation for LLMs with
  an Efficient Context Memory"): the distant cache is cut into blocks ("memory units") of
  `block` tokens. Key m's representative score is the sum of the logits that the `window`
  queries from m on gave it while it sat in their local window, r_m = sum_{j < window}
  q_{m+j} . k_m (true positions; summed over the KV head's query heads). Once those queries
  have run, the mean of the block's `R` best-scored keys per KV head is frozen as its block key
  (InfLLM's representative keys, which it also averages). A query scores each complete block
  before its window by the sum over heads of q . block key (at the far positions) and
  retrieves the best `top_k / block` blocks. InfLLM shares
  one selection across a prefill chunk; here each query selects for itself, as InfLLM does
  when decoding, so that a prefill equals token-by-token decoding.
- **TokenSelect** (Wu et al. 2025, "TokenSelect: Efficient Long-Context Inference and Length
  Extrapolation for LLMs via Dynamic Token-Level KV Cache Selection"): every query head scores
  every candidate token (q . k, at the far positions), normalises its scores by a softmax, and
  the heads vote: the `top_k` tokens with the largest summed probability are selected. The
  *selection cache*: a query whose cosine similarity to the previous query reaches
  `reuse_threshold` reuses the previous selection instead of scoring the cache.
- **HiP** (Lee et al. 2024): hierarchical pruning of the candidate blocks by their ranges'
  center tokens, O(top_k log S) keys scored per query (`hip_select`).

The representative scores need q_{m..m+W-1} for every key m: they are kept as prefix sums
P(i) = sum_{j <= i} q_j (rotated, summed over each KV head's query heads) in a ring of the last
`prefix_slots` positions, so r_m = (P(m + W - 1) - P(m - 1)) . k_m costs two reads per key when
its block is frozen, not a pass over the window at every step. The sums are float32; their
rounding grows with the position (relative 1e-7 of the sum), far below what changes a ranking.

Shapes: B batch, C queries, N query heads sharing K KV heads, H head dim, S cache slots.
"""

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.softmax import softmax
from longjax.ops import retrieval


def prefix_slots(window: int, block: int, chunk: int) -> int:
  """Ring slots for InfLLM's prefix sums: a chunk freezes blocks that started up to
  window + 2 * block positions before it."""
  return window + 2 * block + chunk + 1


def _read_ring(ring, index):
  """ring [B, R, K, H] at positions `index` (any shape) -> [B, *index.shape, K, H]; P(-1) = 0."""
  values = ring[:, index % ring.shape[1]]
  return jnp.where((index >= 0)[None, ..., None, None], values, 0.0)


def update_prefix(ring, q_sum, q_index):
  """Writes P(i) for the chunk's positions. ring [B, R, K, H] float32; q_sum [B, C, K, H] the
  chunk's rotated queries summed over each KV head's query heads; q_index [C] consecutive."""
  base = _read_ring(ring, q_index[0] - 1)  # [B, K, H]
  sums = base[:, None] + jnp.cumsum(q_sum.astype(jnp.float32), axis=1)
  return ring.at[:, q_index % ring.shape[1]].set(sums)


def frozen_blocks(last, window: int, block: int):
  """Blocks whose representative scores are complete once queries <= last have run."""
  return jnp.maximum(last + 2 - window, 0) // block


def freeze_block_keys(block_keys, ring, k_cache, first, last, *, window: int, block: int,
                      representatives: int, chunk: int, rotate,
                      gather=retrieval.gather_runs):
  """Freezes the block keys of the blocks completed by the queries first..last.

  Args:
    block_keys: [B, G, K, H] each block's mean representative key (unrotated), G = S // block.
    ring: [B, R', K, H] prefix sums holding P(first - window - 2 block - 1) .. P(last).
    k_cache: [B, S, K, H] unrotated keys.
    first, last: int32 [], the chunk's first and last query positions; chunk: its static
      length (bounds the number of blocks it completes).
    representatives: R, the best-scored keys averaged per block and KV head.
    rotate: the model's rotation (keys at their true positions for the scores).
    gather: reads runs of cache rows (`longjax.ops.retrieval.gather_runs`, or its host form).

  Returns:
    the updated block_keys.
  """
  b, g_total, kv_heads, h = block_keys.shape
  start, stop = frozen_blocks(first - 1, window, block), frozen_blocks(last, window, block)
  count = min(-(-chunk // block), g_total)  # multiples of block in (first - 1, last] + 2 - W
  g = start + jnp.arange(count)
  m = jnp.minimum(g, g_total - 1)[:, None] * block + jnp.arange(block)  # [count, block]

  def new_keys():  # [B, count, K, H]: each block's mean of its best-scored keys
    window_sums = _read_ring(ring, m + window - 1) - _read_ring(ring, m - 1)  # [B, c, blk, K, H]
    starts = jnp.broadcast_to(m[None, None, :, 0], (b, 1, count))
    keys = gather(k_cache, starts, block).reshape(b, count, block, kv_heads, h)
    rotated = rotate(keys.reshape(b, count * block, kv_heads, h),
                     jnp.broadcast_to(m.reshape(-1), (b, count * block)), True)
    scores = jnp.sum(window_sums.reshape(b, count * block, kv_heads, h)
                     * rotated.astype(jnp.float32), axis=-1)  # [B, count * block, K]
    scores = jnp.moveaxis(scores.reshape(b, count, block, kv_heads), 2, 3)  # [B, c, K, block]
    _, best = jax.lax.top_k(scores, representatives)  # [B, count, K, R]
    chosen = jnp.take_along_axis(jnp.moveaxis(keys, 2, 3), best[..., None], axis=3)
    return chosen.mean(axis=3).astype(block_keys.dtype)

  # A decode step completes a block once every `block` steps: the cond skips the scoring the
  # other times (0.45 of 1.7 ms per layer and step at 64k); the write stays outside it, so that
  # block_keys is updated in place.
  keys = jax.lax.cond(stop > start, new_keys,
                      lambda: jnp.zeros((b, count, kv_heads, h), block_keys.dtype))
  target = jnp.where(g < stop, g, g_total)  # not completed yet: dropped
  return block_keys.at[:, target].set(keys, mode="drop")


def infllm_select(block_keys, q_far, q_index, *, top_blocks: int, block: int, sinks: int,
                  window: int):
  """The best blocks by score per query, shared by all heads: (starts [B, C, top_blocks] the
  blocks' first tokens, valid [B, C, top_blocks * block]).

  block_keys: [B, G, K, H]; q_far: [B, C, N, H]. The [G, K * H] block keys make the scoring
  one matrix-vector product per query (0.1 ms for 512 blocks)."""
  g_total, kv_heads = block_keys.shape[1], block_keys.shape[2]
  q_sum = retrieval.kv_head_sums(q_far, kv_heads)
  scores = jnp.einsum("bckh,bgkh->bcg", q_sum, block_keys.astype(q_far.dtype),
                      preferred_element_type=jnp.float32)
  first, end = retrieval.candidate_blocks(q_index, block=block, sinks=sinks, window=window)
  g = jnp.arange(g_total)
  usable = (g[None, :] >= first) & (g[None, :] < end[:, None])  # [C, G]
  return _best_blocks(jnp.where(usable[None], scores, -jnp.inf), block_ids=None,
                      top_blocks=min(top_blocks, g_total), block=block)


def _best_blocks(scores, *, block_ids, top_blocks: int, block: int):
  """The `top_blocks` best-scored blocks as the far part's runs: (starts [B, C, k] their first
  tokens, valid [B, C, k * block]); -inf scores are not candidates. scores [B, C, J] over the
  blocks `block_ids` [B, C, J] (None: block j is block j)."""
  best, chosen = jax.lax.top_k(scores, top_blocks)
  if block_ids is not None:
    chosen = jnp.take_along_axis(block_ids, chosen, axis=-1)
  return (chosen * block).astype(jnp.int32), jnp.repeat(jnp.isfinite(best), block, axis=-1)


def hip_select(q_far, k_cache, q_index, *, top_blocks: int, block: int, sinks: int,
               window: int, gather=retrieval.gather_runs):
  """HiP's hierarchical pruning (Lee et al. 2024, "HiP Attention: Sparse Sub-Quadratic
  Attention with Hierarchical Attention Pruning"), over the complete blocks before the window.

  The candidate blocks are cut into 2k ranges; each range is scored by its *center token*
  (attention locality: neighbours of a key score alike), summed over heads; the best k are
  kept and each is split in two; and so on, until every range is one block. Whatever the
  context, a query scores 2k keys per level and log2(blocks / k) levels: O(k log S), with no
  state beyond the cache. HiP prunes to single tokens or small blocks; we stop at
  `block` (the unit the far part gathers).

  Args:
    q_far: [B, C, N, H] far queries; k_cache: [B, S, K, H] unrotated keys.
    q_index: [C] positions; top_blocks: k.
    gather: reads runs of cache rows (`longjax.ops.retrieval.gather_runs`, or its host form).

  Returns:
    (starts [B, C, k] the chosen blocks' first tokens, valid [B, C, k * block]).
  """
  b, c = q_far.shape[:2]
  s, kv_heads = k_cache.shape[1], k_cache.shape[2]
  g_total = s // block
  top_blocks = min(top_blocks, g_total)
  qg = retrieval.kv_head_sums(q_far, kv_heads)  # [B, C, K, H]
  first, end = retrieval.candidate_blocks(q_index, block=block, sinks=sinks, window=window)
  count = jnp.maximum(end - first, 0)  # [C] candidate blocks
  nodes = 2 * top_blocks
  cut = first + (count[:, None] * jnp.arange(nodes + 1)) // nodes  # [C, 2k + 1]
  lo = jnp.broadcast_to(cut[None, :, :-1], (b, c, nodes))
  hi = jnp.broadcast_to(cut[None, :, 1:], (b, c, nodes))

  def score(lo, hi):  # ranges [lo, hi) of blocks -> [B, C, nodes], -inf for empty ranges
    center = (lo * block + hi * block) // 2
    keys = gather(k_cache, center, 1)  # [B, C, nodes, K, H]
    x = jnp.einsum("bckh,bcjkh->bcj", qg, keys.astype(q_far.dtype),
                   preferred_element_type=jnp.float32)
    return jnp.where(hi > lo, x, -jnp.inf)

  # Each level halves the ranges: from ceil(G / 2k) blocks to one.
  levels = max(int(np.ceil(np.log2(max(g_total / nodes, 1)))), 0) + 1
  for _ in range(levels):
    _, keep = jax.lax.top_k(score(lo, hi), top_blocks)
    lo = jnp.take_along_axis(lo, keep, axis=-1)
    hi = jnp.take_along_axis(hi, keep, axis=-1)
    mid = (lo + hi + 1) // 2  # a one-block range keeps its block on the left
    lo, hi = jnp.concatenate([lo, mid], -1), jnp.concatenate([mid, hi], -1)
  return _best_blocks(score(lo, hi), block_ids=lo, top_blocks=top_blocks, block=block)


def tokenselect_scores(q_far, k_cache, q_index, *, sinks: int, window: int, scale: float):
  """The heads' soft vote for every cache token: [B, C, S] float32, -1 for non-candidates.

  k_cache is head-major, [B, K, S, H]: one matmul per head, where the [B, S, K, H] layout
  made XLA transpose the whole cache at every step (122 vs 8 ms at 64k, d512)."""
  b, c, n, h = q_far.shape
  kv_heads, s = k_cache.shape[1], k_cache.shape[2]
  qg = q_far.reshape(b, c, kv_heads, n // kv_heads, h)
  x = jnp.einsum("bckgh,bksh->bckgs", qg, k_cache.astype(q_far.dtype),
                 preferred_element_type=jnp.float32) * scale
  key = jnp.arange(s)
  usable = (key[None, :] >= sinks) & (key[None, :] <= q_index[:, None] - window)  # [C, S]
  p = softmax(jnp.where(usable[None, :, None, None], x, -jnp.inf))
  return jnp.where(usable[None], jnp.sum(p, axis=(2, 3)), -1.0)


def tokenselect_select(state, q_far, k_cache, q_index, *, top_k: int, sinks: int,
                       window: int, reuse_threshold: float):
  """TokenSelect's selection with its selection cache.

  Args:
    state: (last_q [B, N, H] the previous query (far-rotated), last_ids [B, top_k] int32 its
      selection, -1 for none, has_last bool []).
    q_far: [B, C, N, H] consecutive queries; k_cache: [B, K, S, H] unrotated keys, head-major
      (`tokenselect_scores`).

  Returns:
    ((ids [B, C, top_k], valid [B, C, top_k]), the new state).
  """
  last_q, last_ids, has_last = state
  b, c, n, h = q_far.shape
  top_k = last_ids.shape[-1]
  flat = q_far.reshape(b, c, n * h).astype(jnp.float32)
  previous = jnp.concatenate([last_q.reshape(b, 1, n * h).astype(jnp.float32), flat[:, :-1]],
                             axis=1)
  cosine = jnp.sum(flat * previous, -1) / jnp.maximum(
      jnp.linalg.norm(flat, axis=-1) * jnp.linalg.norm(previous, axis=-1), 1e-30)
  reuse = (cosine >= reuse_threshold) & ((jnp.arange(c) > 0) | has_last)[None]  # [B, C]

  def fresh():
    votes = tokenselect_scores(q_far, k_cache, q_index, sinks=sinks, window=window,
                               scale=h ** -0.5)
    best, chosen = jax.lax.top_k(votes, top_k)
    return jnp.where(best >= 0, chosen, -1).astype(jnp.int32)  # [B, C, k]

  if c == 1:  # a decode step: score the cache only when some row does not reuse
    ids = jax.lax.cond(jnp.all(reuse), lambda: last_ids[:, None], fresh)
  else:
    ids = fresh()
  # Query i uses the selection of the last query j <= i that did not reuse (-1: the cache's).
  source = jax.lax.cummax(jnp.where(reuse, -1, jnp.arange(c)), axis=1)
  chosen = jnp.where((source >= 0)[..., None],
                     jnp.take_along_axis(ids, jnp.maximum(source, 0)[..., None], axis=1),
                     last_ids[:, None])
  state = (q_far[:, -1].astype(last_q.dtype), chosen[:, -1], jnp.asarray(True))
  return (jnp.maximum(chosen, 0), chosen >= 0), state
