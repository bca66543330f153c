"""Retrieval attention over a long KV cache: the one mechanism under the training-free policies
(InfLLM, TokenSelect; `longjax.ops.retrieval_policies`).

Every policy keeps the whole cache and lets each query attend to three sets of keys, in one
softmax (the exact log-sum-exp merge of the three parts):

- sinks: the first `sinks` cache entries (the "initial tokens" of StreamingLLM and InfLLM);
- the local window: keys lo(t) <= j <= t, lo(t) the query's last `window` keys rounded down to a
  multiple of `align` (a block policy keeps whole blocks out of its candidates, so its window
  runs back to the first block it cannot retrieve);
- the selection: cache entries the policy picks among the candidates sinks <= j < lo(t), per
  KV head (ids [B, T, K, M]).

Positions follow InfLLM (Xiao et al. 2024, "InfLLM: Training-Free Long-Context Extrapolation
for LLMs with an Efficient Context Memory"), for every policy alike so that policies differ
only in what they select: window keys keep their true distances, sinks and selected keys all sit
`window` tokens before the query, so no query meets a distance beyond window + align. With the
whole cache selected this is full attention whose far keys are moved to that distance.

Keys are cached unrotated. The local window (a few thousand keys) is rotated per call; far keys
are used as they are: the query is rotated at `window` and then by the key's rotation at 0
(`far_queries`), which for every rotary encoding here is a per-feature scale (1 for RoPE and
xPos, YaRN's attention factor) and so moves from the key onto the query.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels_pallas.softmax import softmax

QUERY_CHUNK = 128  # queries per step of the loops: bounds the [chunk, keys] temporaries

# A policy's selection, called per chunk of queries:
#   (state, q_far [B, C, N, H], q_index [C], live [C] bool) -> ((ids, valid), state)
# ids [B, C, K, M] int32 cache indices (sinks <= id < lo(t) where valid), valid [B, C, K, M];
# `state` is the policy's carry from chunk to chunk (None if it keeps none), `live` marks the
# chunk's real queries (the last chunk is padded).
Select = Callable[..., tuple[tuple[jax.Array, jax.Array], object]]


def local_start(q_index, window: int, align: int):
  """lo(t): the first key of each query's local window, [T] int32 (see the module docstring)."""
  return jnp.maximum(q_index + 1 - window, 0) // align * align


def far_queries(q, window: int, rotate: Callable):
  """Queries [B, T, N, H] rotated to score unrotated keys at distance `window`."""
  b, t = q.shape[:2]
  at_window = rotate(q, jnp.full((b, t), window, jnp.int32), False)
  return rotate(at_window, jnp.zeros((b, t), jnp.int32), True)


def local_span(window: int, align: int, chunk: int, cache_length: int) -> int:
  """Keys a chunk of queries can see in its local windows: a static slice length."""
  return min(window + align + chunk, cache_length)


def _grouped(x, kv_heads):
  """[B, C, N, H] -> [B, C, K, N/K, H]."""
  b, c, n, h = x.shape
  return x.reshape(b, c, kv_heads, n // kv_heads, h)


def retrieval_attention(q, k_cache, v_cache, q_index, *, window: int, sinks: int, align: int,
                        select: Select | None, rotate: Callable, select_state=None,
                        scale_queries: Callable | None = None, chunk: int = QUERY_CHUNK,
                        scale: float | None = None):
  """Sinks + local window + the policy's selection, one softmax per query and head.

  Args:
    q: [B, T, N, H] unrotated queries.
    k_cache, v_cache: [B, S, K, H] unrotated keys and values; every index <= max(q_index)
      written (the queries' own keys included).
    q_index: [T] int32, each query's cache index, which is also its position.
    window, sinks, align: the layout of the module docstring (window >= 1, align >= 1).
    select: the policy's selection (`Select`), called per chunk of queries with their far
      queries; None attends to sinks and window only.
    select_state: the selection's carry before the first chunk.
    rotate: (x [B', L, heads, H], positions [B', L], is_key) -> x rotated by the model's
      encoding (relative, and a per-feature scale at position 0).
    scale_queries: (q, positions [B, C]) -> q after rotation (log-n scaling), or None.
    chunk: queries per step.
    scale: multiplies q.k; None means H ** -0.5.

  Returns:
    (out [B, T, N, H] in q.dtype, the selection's state after the last query).
  """
  b, t, n, h = q.shape
  s, kv_heads = k_cache.shape[1], k_cache.shape[2]
  scale = h ** -0.5 if scale is None else scale
  chunk = min(chunk, t)
  chunks = -(-t // chunk)
  pad = chunks * chunk - t
  span = local_span(window, align, chunk, s)
  qc = jnp.pad(q, [(0, 0), (0, pad), (0, 0), (0, 0)]).reshape(b, chunks, chunk, n, h)
  ic = jnp.pad(q_index, (0, pad), mode="edge").reshape(chunks, chunk)
  k_sink, v_sink = k_cache[:, :sinks], v_cache[:, :sinks]
  bi = jnp.arange(b)[:, None, None, None]
  ki = jnp.arange(kv_heads)[None, None, :, None]

  live_c = (jnp.arange(chunks * chunk) < t).reshape(chunks, chunk)

  def one_chunk(state, args):
    q_chunk, index, live = args  # [B, C, N, H], [C], [C]
    lo = local_start(index, window, align)
    positions = jnp.broadcast_to(index, (b, chunk))
    q_loc = rotate(q_chunk, positions, False)
    q_far = far_queries(q_chunk, window, rotate)
    if scale_queries is not None:
      q_loc, q_far = scale_queries(q_loc, positions), scale_queries(q_far, positions)
    start = jnp.clip(lo[0], 0, s - span)
    key = start + jnp.arange(span)
    k_loc = rotate(jax.lax.dynamic_slice_in_dim(k_cache, start, span, axis=1),
                   jnp.broadcast_to(key, (b, span)), True)
    v_loc = jax.lax.dynamic_slice_in_dim(v_cache, start, span, axis=1)
    ql, qf = _grouped(q_loc, kv_heads), _grouped(q_far, kv_heads)
    x_loc = jnp.einsum("bckgh,bskh->bckgs", ql, k_loc, preferred_element_type=jnp.float32)
    seen = (key[None, :] >= lo[:, None]) & (key[None, :] <= index[:, None])  # [C, span]
    parts = [(jnp.where(seen[None, :, None, None], x_loc * scale, -jnp.inf),
              "bckgs,bskh->bckgh", v_loc)]
    if sinks:
      x_sink = jnp.einsum("bckgh,bskh->bckgs", qf, k_sink, preferred_element_type=jnp.float32)
      seen = jnp.arange(sinks)[None, :] < jnp.minimum(lo, sinks)[:, None]
      parts.append((jnp.where(seen[None, :, None, None], x_sink * scale, -jnp.inf),
                    "bckgs,bskh->bckgh", v_sink))
    if select is not None:
      (ids, valid), state = select(state, q_far, index, live)  # [B, C, K, M]
      k_sel, v_sel = k_cache[bi, ids, ki], v_cache[bi, ids, ki]  # [B, C, K, M, H]
      x_sel = jnp.einsum("bckgh,bckmh->bckgm", qf, k_sel, preferred_element_type=jnp.float32)
      parts.append((jnp.where(valid[:, :, :, None], x_sel * scale, -jnp.inf),
                    "bckgm,bckmh->bckgh", v_sel))
    p = softmax(jnp.concatenate([z for z, _, _ in parts], axis=-1))
    out, offset = 0.0, 0
    for z, spec, values in parts:  # the parts' weights times their values, summed
      piece = p[..., offset:offset + z.shape[-1]]
      offset += z.shape[-1]
      out = out + jnp.einsum(spec, piece.astype(values.dtype), values,
                             preferred_element_type=jnp.float32)
    return state, out.reshape(b, chunk, n, h).astype(q.dtype)

  state, out = jax.lax.scan(one_chunk, select_state,
                            (qc.transpose(1, 0, 2, 3, 4), ic, live_c))  # [chunks, B, C, N, H]
  return out.transpose(1, 0, 2, 3, 4).reshape(b, chunks * chunk, n, h)[:, :t], state
