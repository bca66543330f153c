"""Landmark Attention (Mohtashami & Jaggi 2023): the grouped softmax for training and prefill,
and top-k block retrieval for decoding from a long cache.

Sequences are landmarked (`longjax.ops.landmarks`): blocks of `block` positions, the last one
the block's landmark. Query i attends, in one *main* softmax, to the regular keys of its own
block (causally) and to the landmarks of earlier blocks; a regular key j of an earlier block g
then gets the landmark's main probability times the softmax of the block's regular logits. Both
forms below use the identity of `kernels_pallas/landmark/tiles.py`: that is one ordinary softmax
over the *shifted logits* z_j = x_j + (x_L(g) - lse_g) of earlier regular keys (x_L(g) the
landmark's logit, lse_g the log-sum-exp of g's regular logits) and x_j of the current block.

`grouped_softmax_attention` is the training form in XLA (queries in chunks, each chunk
rematerialised in the backward pass, so memory is O(chunk x T)); it also takes packed
documents' segment ids, as the Pallas kernel does. `retrieval_attention` is the
inference form: each query scores every complete block by its landmark, keeps the top k per
head and attends to them and to its own block, with the paper's positions for retrieved blocks
(see there). With k >= the number of blocks it equals the training form.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels_pallas import landmark as landmark_kernels
from kernels_pallas.softmax import logsumexp
from kernels_pallas.softmax import softmax

IMPLS = ("auto", "xla", "pallas")
QUERY_CHUNK = 128  # queries per chunk of both forms: bounds their [chunk, keys] temporaries


def _shifted_block_logits(x, landmark_visible, regular_visible):
  """Shifted logits of whole blocks: x [..., G, block] -> [..., G, block - 1].

  Regular key j of block g becomes x_j + x_L(g) - lse_g (lse over the visible regular keys);
  -inf where the key or its block's landmark is hidden.
  """
  regular = jnp.where(regular_visible, x[..., :-1], -jnp.inf)
  lse = logsumexp(regular)
  shift = jnp.where(landmark_visible & jnp.isfinite(lse), x[..., -1] - lse, -jnp.inf)
  return regular + shift[..., None]


def grouped_softmax_attention(q, k, v, *, block: int, segment_ids=None,
                              scale: float | None = None):
  """Causal landmark attention over a landmarked sequence, in XLA.

  Args:
    q: [B, T, N, H] queries (already rotated).
    k, v: [B, T, K, H] keys (rotated) and values, N % K == 0.
    block: positions per block including its landmark (landmarks at (i + 1) % block == 0).
    segment_ids: [B, T] int32 documents of a packed row, or None. A query sees only keys of its
      own document (its block's regular keys, earlier blocks' landmarks and regular keys); an
      earlier block without a regular key of the query's document is skipped, landmark too.
    scale: multiplies q.k; None means H ** -0.5.

  Returns:
    [B, T, N, H] in q.dtype.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  scale = h ** -0.5 if scale is None else scale
  blocks = -(-t // block)
  keys = blocks * block
  pad = [(0, 0), (0, keys - t), (0, 0), (0, 0)]
  k, v = jnp.pad(k, pad), jnp.pad(v, pad)
  chunk = min(QUERY_CHUNK, t)
  chunks = -(-t // chunk)
  qc = jnp.pad(q, [(0, 0), (0, chunks * chunk - t), (0, 0), (0, 0)])
  qc = qc.reshape(b, chunks, chunk, kv_heads, n // kv_heads, h).transpose(1, 0, 2, 3, 4, 5)
  if segment_ids is not None:  # keys' documents (padding: none) and the queries' (padded)
    key_seg = jnp.pad(segment_ids, [(0, 0), (0, keys - t)], constant_values=-1)
    query_seg = jnp.pad(segment_ids, [(0, 0), (0, chunks * chunk - t)])
  key_index = jnp.arange(keys).reshape(blocks, block)
  key_block = key_index // block

  @jax.checkpoint
  def one_chunk(args):
    q_chunk, c = args  # q_chunk [B, C, K, G, H]
    q_index = c * chunk + jnp.arange(chunk)
    q_block = q_index // block
    x = jnp.einsum("bckgh,bskh->bkgcs", q_chunk, k, preferred_element_type=jnp.float32) * scale
    x = x.reshape(*x.shape[:-1], blocks, block)
    same = jnp.ones((1, chunk, keys), bool) if segment_ids is None else (
        query_seg[:, q_index][:, :, None] == key_seg[:, None, :])
    same = same.reshape(same.shape[0], 1, 1, chunk, blocks, block)
    earlier = (key_block[:, 0][None, :] < q_block[:, None])[:, :, None]  # [C, G, 1]
    z_earlier = _shifted_block_logits(x, earlier[..., 0] & same[..., -1],
                                      earlier & same[..., :-1])
    current = ((key_block == q_block[:, None, None])
               & (key_index <= q_index[:, None, None]) & ((key_index + 1) % block != 0))
    z_current = jnp.where(current & same, x, -jnp.inf)[..., :-1]
    z = jnp.where(earlier, z_earlier, z_current)  # a block is earlier or current, never both
    p = softmax(z.reshape(*z.shape[:-2], -1)).reshape(z.shape)
    vb = v.reshape(b, blocks, block, kv_heads, h)[:, :, :-1]
    out = jnp.einsum("bkgcsj,bsjkh->bckgh", p.astype(v.dtype), vb,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)

  out = jax.lax.map(one_chunk, (qc, jnp.arange(chunks)))  # [chunks, B, C, K, G, H]
  return out.transpose(1, 0, 2, 3, 4, 5).reshape(b, chunks * chunk, n, h)[:, :t]


def landmark_attention(q, k, v, *, block: int, segment_ids=None, impl: str = "auto"):
  """The training form by `impl`: "xla" (`grouped_softmax_attention`), "pallas"
  (`kernels_pallas.landmark_attention`) or "auto" (Pallas on TPU and GPU, XLA on the CPU,
  where the Pallas interpreter is far slower)."""
  if impl not in IMPLS:
    raise ValueError(f"landmark attention impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    impl = "pallas" if jax.default_backend() != "cpu" else "xla"
  if impl == "pallas":
    return landmark_kernels.landmark_attention(q, k, v, landmark_block=block,
                                               segment_ids=segment_ids)
  return grouped_softmax_attention(q, k, v, block=block, segment_ids=segment_ids)


def in_block_keys(k, index, rotate, block: int):
  """Keys [B, T, K, H] at landmarked indices `index` [T], rotated at their offset in their block.

  This is how the decode cache keeps keys. Every encoding a landmark layer accepts is relative
  (a rotated query at p and a rotated key at p' score as a function of p - p', RoPE and xPos
  alike), so a key rotated at its offset j serves any slot s it is retrieved into: the query is
  rotated at its own position minus s * block instead. A step then rotates a few query vectors
  rather than every retrieved key: rotating a 64k cache's 1024 landmark keys per step took 2.4
  of a layer's 6.5 ms per token before.
  """
  return rotate(k, jnp.broadcast_to(index % block, k.shape[:2]), True)


def _rotate_queries(q, positions, rotate):
  """q [B, T, N, H] rotated at positions broadcastable to [B, T, N, J] -> [B, T, N, J, H]."""
  b, t, n, h = q.shape
  j = positions.shape[-1]
  copies = jnp.broadcast_to(q[:, :, :, None], (b, t, n, j, h)).reshape(-1, 1, 1, h)
  flat = jnp.broadcast_to(positions, (b, t, n, j)).reshape(-1, 1)
  return rotate(copies, flat, False).reshape(b, t, n, j, h)


def select_blocks(q, landmarks, n, r, *, top_k: int, block: int, rotate: Callable):
  """Top-k blocks per query and head, scored by the blocks' landmark keys.

  Scoring positions follow the paper's code: the m = min(k, n) most recent blocks keep their
  place before the query's block (slots 1..m), every older one sits in the first slot (slot 0),
  so a block is not chosen for being near the query; the query is at (m + 1) * block + r.

  Args:
    q: [B, T, N, H] unrotated queries.
    landmarks: [B, K, G, H] the blocks' landmark keys, head-major, rotated at their offset
      (block - 1).
    n: [T] int32, complete blocks before each query's block (the candidates are blocks < n).
    r: [T] int32, each query's offset in its block.
    top_k: blocks kept per query and head (static, <= G).
    block: positions per block.
    rotate: (x [B', L, heads, H], positions [B', L], is_key) -> x rotated.

  Returns:
    (ids [B, T, N, top_k] int32 in increasing order, valid [B, T, N, top_k] bool); invalid
    entries (fewer than top_k candidates) come last.
  """
  b, t, n_heads, h = q.shape
  kv_heads, g = landmarks.shape[1], landmarks.shape[2]
  groups = n_heads // kv_heads
  m = jnp.minimum(top_k, n)
  # Slot s sits s * block before slot 0's place relative to the query: query positions for
  # slot 0 and for the recent slots 1..k, minus the landmark's own offset (in the key).
  slots = jnp.arange(top_k + 1)
  pos = ((m + 1)[:, None] - slots) * block + r[:, None]  # [T, k + 1]
  qs = _rotate_queries(q, jnp.broadcast_to(pos[:, None, :], (t, n_heads, top_k + 1)), rotate)
  qs = qs.reshape(b, t, kv_heads, groups, top_k + 1, h)
  # Head-major landmarks make this a batched matmul without a transpose of the G keys.
  scores = jnp.einsum("btkgh,bksh->btkgs", qs[..., 0, :], landmarks,
                      preferred_element_type=jnp.float32).reshape(b, t, n_heads, g)
  recent = n[:, None] - m[:, None] + jnp.arange(top_k)  # [T, k]
  recent_keys = landmarks[:, :, jnp.clip(recent, 0, g - 1)]  # [B, K, T, k, H]
  recent_scores = jnp.einsum("btkgjh,bktjh->tjbkg", qs[..., 1:, :], recent_keys,
                             preferred_element_type=jnp.float32).reshape(t, top_k, b, n_heads)
  # Written over the slot-0 scores; entries past m (not recent blocks) are dropped.
  target = jnp.where(jnp.arange(top_k) < m[:, None], recent, g)
  scores = scores.at[:, jnp.arange(t)[:, None], :, target].set(recent_scores, mode="drop")
  scores = jnp.where(jnp.arange(g) < n[None, :, None, None], scores, -jnp.inf)
  best, chosen = jax.lax.top_k(scores, top_k)
  order = jnp.sort(jnp.where(jnp.isfinite(best), chosen, g), axis=-1)
  return jnp.minimum(order, g - 1).astype(jnp.int32), order < g


def retrieval_attention(q, k_cache, v_cache, landmarks, q_index, *, block: int, top_k: int,
                        rotate: Callable, scale: float | None = None):
  """Landmark attention of queries against a cache, each attending to its top-k blocks.

  Query t (at landmarked index q_index[t], in block n = q_index // block, at offset
  r = q_index % block) sees the regular keys of its own block up to itself and the top-k
  complete earlier blocks by landmark score, per query head, through the grouped softmax.
  Positions follow the paper's inference code: with m = min(k, n) blocks retrieved, the
  retrieved blocks, in their original order, fill m of m + 1 block slots before the query's
  block (a block among the m most recent sits one slot later), the query is at (m + 1) * block
  + r, so no distance exceeds (m + 2) * block whatever the context. With m = n every block keeps
  its true distance, so k >= n gives exactly `grouped_softmax_attention`.

  Args:
    q: [B, T, N, H] unrotated queries.
    k_cache: [B, S, K, H] keys rotated at their offset in their block (`in_block_keys`), S a
      multiple of `block`; every index <= max(q_index) written.
    v_cache: [B, S, K, H] values.
    landmarks: [B, K, S // block, H] each block's landmark key (as in k_cache), head-major.
    q_index: [T] int32 landmarked indices of the queries.
    block: positions per block including its landmark.
    top_k: blocks retrieved per query and head (>= 1; at most S // block are used).
    rotate: (x [B', L, heads, H], positions [B', L], is_key) -> x rotated by the model's
      positional encoding, which must be relative (see `in_block_keys`).
    scale: multiplies q.k; None means H ** -0.5.

  Returns:
    [B, T, N, H] in q.dtype.
  """
  b, t, n_heads, h = q.shape
  s, kv_heads = k_cache.shape[1], k_cache.shape[2]
  scale = h ** -0.5 if scale is None else scale
  g = s // block
  k_top = min(top_k, g)
  blocks_k = k_cache.reshape(b, g, block, kv_heads, h)
  blocks_v = v_cache.reshape(b, g, block, kv_heads, h)
  kv_of_head = jnp.arange(n_heads) // (n_heads // kv_heads)
  chunk = min(QUERY_CHUNK, t)
  chunks = -(-t // chunk)
  pad = chunks * chunk - t
  qc = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, chunks, chunk, n_heads, h)
  ic = jnp.pad(q_index, (0, pad), mode="edge").reshape(chunks, chunk)

  def one_chunk(args):
    q_chunk, index = args  # [B, C, N, H], [C]
    n = index // block
    r = index % block
    bi = jnp.arange(b)[:, None, None, None]
    heads = kv_of_head[None, None, :, None]
    # Own block: keys n * block + j; the query at offset r sees j <= r, never its landmark.
    j = jnp.arange(block)
    local_index = n[:, None] * block + j  # [C, block]
    k_loc = k_cache[bi, local_index[None, :, None, :], heads]  # [B, C, N, block, H]
    v_loc = v_cache[bi, local_index[None, :, None, :], heads]
    q_loc = _rotate_queries(q_chunk, jnp.broadcast_to(r[:, None, None], (chunk, n_heads, 1)),
                            rotate)[:, :, :, 0]
    x_loc = jnp.einsum("bcnh,bcnjh->bcnj", q_loc, k_loc, preferred_element_type=jnp.float32)
    visible = (j[None, :] <= r[:, None]) & (j[None, :] != block - 1)
    z_loc = jnp.where(visible[None, :, None, :], x_loc * scale, -jnp.inf)
    if k_top == 0:
      z, values = z_loc, v_loc
    else:
      ids, valid = select_blocks(q_chunk, landmarks, n, r, top_k=k_top, block=block,
                                 rotate=rotate)  # [B, C, N, k]
      m = jnp.minimum(k_top, n)[None, :, None, None]
      slot = jnp.arange(k_top) + (ids >= n[None, :, None, None] - m)
      # A block at slot s: its keys sit s * block after slot 0, the query (m + 1) * block + r.
      q_ret = _rotate_queries(q_chunk, (m + 1 - slot) * block + r[None, :, None, None], rotate)
      k_ret = blocks_k[bi, ids, :, heads]  # [B, C, N, k, block, H]
      v_ret = blocks_v[bi, ids, :, heads]
      x_ret = jnp.einsum("bcnkh,bcnkjh->bcnkj", q_ret, k_ret,
                         preferred_element_type=jnp.float32) * scale
      z_ret = _shifted_block_logits(x_ret, valid, valid[..., None])
      z = jnp.concatenate([z_loc, z_ret.reshape(b, chunk, n_heads, -1)], axis=-1)
      values = jnp.concatenate(
          [v_loc, v_ret[..., :-1, :].reshape(b, chunk, n_heads, -1, h)], axis=-2)
    p = softmax(z)
    return jnp.einsum("bcnj,bcnjh->bcnh", p.astype(values.dtype), values,
                      preferred_element_type=jnp.float32).astype(q.dtype)

  out = jax.lax.map(one_chunk, (qc.transpose(1, 0, 2, 3, 4), ic))  # [chunks, B, C, N, H]
  return out.transpose(1, 0, 2, 3, 4).reshape(b, chunks * chunk, n_heads, h)[:, :t]
