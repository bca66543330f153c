"""Training-free retrieval policies for softmax attention layers: the policy's cache and its
decode step (the `retrieval*` config fields: `longjax.layers.retrieval_config`).

A policy changes nothing in training. It applies whenever the layer runs with a cache
(`experiments.sample`, and `experiments.evaluate`, which then evaluates through a prefill into
the cache as the model decodes): every query attends to the first `retrieval_sinks` tokens, its
last `retrieval_window` tokens and `retrieval_top_k` tokens the policy selects from the rest
(`longjax.ops.retrieval`, `longjax.ops.retrieval_policies`), or with DuoAttention's split
its retrieval heads every key and its streaming heads none. So any trained attention model can
be evaluated with InfLLM, TokenSelect, HiP or DuoAttention by a config override, e.g.

    python -m experiments.evaluate --workdir=runs/x --config.model.attention.retrieval=infllm \
        --config.model.attention.retrieval_window=512
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from longjax.layers import caches
from longjax.layers.retrieval_config import RetrievalPolicy
from longjax.ops import AttentionMask
from longjax.ops import block_lru
from longjax.ops import dot_product_attention
from longjax.ops import merge_attention
from longjax.ops import retrieval as ops
from longjax.ops import retrieval_policies as policies


def init_cache(policy: RetrievalPolicy, batch_size: int, max_length: int, num_heads: int,
               num_kv_heads: int, head_dim: int, dtype) -> caches.RetrievalCache:
  """An empty cache for `max_length` tokens (InfLLM: rounded up to whole blocks)."""
  length = -(-max_length // policy.align) * policy.align
  ring = (batch_size, policy.window, num_kv_heads, head_dim)
  if policy.name == "infllm":
    slots = policies.prefix_slots(policy.window, policy.block, policy.chunk)
    state = {"prefix": jnp.zeros((batch_size, slots, num_kv_heads, head_dim), jnp.float32),
             "block_keys": jnp.zeros((batch_size, length // policy.block, num_kv_heads,
                                      head_dim), dtype)}
  elif policy.name == "duo":
    # Every KV head a retrieval head until `for_layer` applies the split; the distant part's
    # attention mass per head is what the calibration ranks heads by (`longjax.eval.duo`).
    sinks = (batch_size, policy.sinks, num_kv_heads, head_dim)
    state = {"heads": jnp.arange(num_kv_heads, dtype=jnp.int32),
             "distant_mass": jnp.zeros((batch_size, num_kv_heads), jnp.float32),
             "sink_k": jnp.zeros(sinks, dtype), "sink_v": jnp.zeros(sinks, dtype)}
  elif policy.name == "tokenselect":
    # TokenSelect scores every cached key: it keeps them once more, head-major, for that.
    state = {"keys_by_head": jnp.zeros((batch_size, num_kv_heads, length, head_dim), dtype),
             "last_q": jnp.zeros((batch_size, num_heads, head_dim), dtype),
             "last_ids": jnp.full((batch_size, min(policy.top_k, length)), -1, jnp.int32),
             "has_last": jnp.zeros((), bool)}
  else:  # HiP scores the cached keys themselves
    state = {}
  shape = (batch_size, length, num_kv_heads, head_dim)
  if policy.placement == "host":  # only the blocks a step reads come to the device
    k, v = (jax.device_put(jnp.zeros(shape, dtype), jax.memory.Space.Host) for _ in range(2))
    if policy.hot_blocks:
      hot = (batch_size, policy.hot_blocks, policy.block, num_kv_heads, head_dim)
      state.update(hot_k=jnp.zeros(hot, dtype), hot_v=jnp.zeros(hot, dtype),
                   hot_blocks=jnp.full(hot[:2], -1, jnp.int32),
                   hot_used=jnp.full(hot[:2], -1, jnp.int32),
                   copied_blocks=jnp.zeros((batch_size,), jnp.int32))
  else:
    k, v = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
  return caches.RetrievalCache(k=k, v=v,
                               ring_k=jnp.zeros(ring, dtype), ring_v=jnp.zeros(ring, dtype),
                               end=jnp.zeros((), jnp.int32), policy=state)


def for_layer(policy: RetrievalPolicy, cache: caches.RetrievalCache, layer: int
              ) -> caches.RetrievalCache:
  """DuoAttention: the empty cache of model layer `layer`, keeping whole only its retrieval
  heads (the streaming heads need only the ring and the sinks). Other policies: unchanged."""
  split = dict(policy.head_split)
  if policy.name != "duo" or not split:
    return cache
  heads = split.get(layer, ())
  b, s, _, h = cache.k.shape
  shape = (b, s, len(heads), h)
  state = dict(cache.policy, heads=jnp.asarray(heads, jnp.int32),
               distant_mass=jnp.zeros((b, len(heads)), jnp.float32))
  return dataclasses.replace(cache, k=jnp.zeros(shape, cache.k.dtype),
                             v=jnp.zeros(shape, cache.v.dtype), policy=state)


def _duo_attend(local, q_far, q_index, k_cache, v_cache, state, *, window: int, impl: str):
  """DuoAttention's step: the local part merged with the far parts, both at the window's
  distance: the sinks for streaming heads, every key before the window for retrieval heads
  (whose cache holds only those heads). Returns (out [B, C, N, H] float32, state with the
  retrieval heads' weight on keys before the window added to `distant_mass`, the statistic
  the calibration ranks heads by)."""
  b, c, n, h = q_far.shape
  kv_heads = state["sink_k"].shape[2]
  group = n // kv_heads
  heads = state["heads"]  # [Kr] retrieval KV heads
  query_heads = (heads[:, None] * group + jnp.arange(group)).reshape(-1)  # [Kr * G]
  retrieval = jnp.zeros((n,), bool).at[query_heads].set(True)
  seen = (q_index >= window)[None, None, :]  # any key before the window at all
  # Keys j <= t - window: causal masking with the queries moved `window` back.
  mask = AttentionMask(causal=True, q_offset=q_index[0] - window)
  pieces = [local]
  if state["sink_k"].shape[1]:
    out, lse = dot_product_attention(q_far, state["sink_k"].astype(q_far.dtype),
                                     state["sink_v"].astype(q_far.dtype), mask=mask, impl=impl,
                                     return_lse=True)
    keep = seen & ~retrieval[None, :, None]
    pieces.append((jnp.where(keep.transpose(0, 2, 1)[..., None], out, 0.0),
                   jnp.where(keep, lse, -jnp.inf)))
  if heads.shape[0] == 0:
    return merge_attention(pieces)[0], state
  out, lse_distant = dot_product_attention(q_far[:, :, query_heads], k_cache, v_cache,
                                           mask=mask, impl=impl, return_lse=True)
  out = jnp.where(seen.transpose(0, 2, 1)[..., None], out, 0.0)
  lse_distant = jnp.where(seen, lse_distant, -jnp.inf)
  pieces.append((jnp.zeros((b, c, n, h), jnp.float32).at[:, :, query_heads].set(out),
                 jnp.full((b, n, c), -jnp.inf).at[:, query_heads].set(lse_distant)))
  out, lse = merge_attention(pieces)
  weight = jnp.exp(lse_distant - lse[:, query_heads])  # [B, Kr * G, C]
  state = dict(state, distant_mass=state["distant_mass"] + weight.reshape(
      b, heads.shape[0], group * c).sum(-1))
  return out, state


def _far_parts(q_index, k_cache, v_cache, policy: RetrievalPolicy, batch: int, gather):
  """The sinks and the remainder (block policies) as `ops.far_attention` parts."""
  c = q_index.shape[0]
  window_start = q_index + 1 - policy.window  # [C]
  shape = lambda x: jnp.broadcast_to(x, (batch, c, x.shape[-1]))
  runs = []
  if policy.sinks:
    sinks = jnp.arange(policy.sinks)
    runs.append((shape(jnp.zeros((1,), jnp.int32)), policy.sinks,
                 shape(sinks[None, :] < window_start[:, None])))
  if policy.align > 1:
    start = ops.complete_blocks_before_window(q_index, policy.window, policy.align)
    rest = start[:, None] + jnp.arange(policy.align)  # [C, align]
    runs.append((shape(start[:, None]), policy.align,
                 shape((rest < window_start[:, None]) & (rest >= policy.sinks))))
  return [(gather(k_cache, starts, run), gather(v_cache, starts, run), ok)
          for starts, run, ok in runs]


def _hot_selection(state, selected, valid, k_cache, v_cache, policy: RetrievalPolicy, step,
                   gather):
  """A decode step's selected blocks through the device LRU (`longjax.ops.block_lru`): the
  selection part of `ops.far_attention` and the updated state."""
  b, _, count = selected.shape
  blocks = selected[:, 0] // policy.block  # [B, k]
  ok = valid[:, 0].reshape(b, count, policy.block)[..., 0]
  slots, missing, state["hot_blocks"], state["hot_used"] = block_lru.lookup(
      state["hot_blocks"], state["hot_used"], blocks, ok, step)
  shape = (b, count, policy.block, *k_cache.shape[2:])
  copy = jnp.any(missing)

  def fetch():  # the whole selection, from host memory
    return tuple(gather(cache, selected, policy.block).reshape(shape).astype(state["hot_k"].dtype)
                 for cache in (k_cache, v_cache))

  rows = jax.lax.cond(copy, fetch, lambda: (jnp.zeros(shape, state["hot_k"].dtype),) * 2)
  state["hot_k"] = block_lru.fill(state["hot_k"], slots, missing, rows[0])
  state["hot_v"] = block_lru.fill(state["hot_v"], slots, missing, rows[1])
  state["copied_blocks"] = state["copied_blocks"] + jnp.where(copy, count, 0)
  flat = lambda hot: block_lru.read(hot, slots).reshape(b, 1, count * policy.block,
                                                         *k_cache.shape[2:])
  return (flat(state["hot_k"]), flat(state["hot_v"]), valid), state


def _chunk(carry, q, k, v, q_index, k_cache, v_cache, policy: RetrievalPolicy, *, rotate,
           scale_queries, impl):
  """One chunk of consecutive queries (`retrieval_decode`): (carry, out [B, C, N, H])."""
  ring_k, ring_v, state = carry
  gather = ops.host_gather_runs if policy.placement == "host" else ops.gather_runs
  b, c = q.shape[:2]
  positions = jnp.broadcast_to(q_index, (b, c))
  q_loc = q_rotated = rotate(q, positions, False)
  q_far = ops.far_queries(q, policy.window, rotate)
  if scale_queries is not None:
    q_loc, q_far = scale_queries(q_loc, positions), scale_queries(q_far, positions)
  k_rot = rotate(k, positions, True)
  # The chunk's keys enter the ring (only its last `window` ones when longer than the ring):
  # after the local part, which reads the ring as it was, except for a single query, whose
  # window the updated ring is (one buffer, updated in place).
  slot = jnp.where(q_index > q_index[-1] - policy.window, q_index % policy.window,
                   policy.window)
  old_ring = ring_k, ring_v
  ring_k = ring_k.at[:, slot].set(k_rot.astype(ring_k.dtype), mode="drop")
  ring_v = ring_v.at[:, slot].set(v.astype(ring_v.dtype), mode="drop")
  local = ops.local_attention(q_loc, *((ring_k, ring_v) if c == 1 else old_ring), k_rot, v,
                              q_index, window=policy.window, impl=impl)
  state = dict(state)
  if policy.name == "duo":
    out, state = _duo_attend(local, q_far, q_index, k_cache, v_cache, state,
                             window=policy.window, impl=impl)
    return (ring_k, ring_v, state), out.astype(q.dtype)
  if policy.name == "hip":
    selected, valid = policies.hip_select(q_far, k_cache, q_index,
                                          top_blocks=policy.top_k // policy.block,
                                          block=policy.block, sinks=policy.sinks,
                                          window=policy.window, gather=gather)
    run = policy.block
  elif policy.name == "infllm":
    state["prefix"] = policies.update_prefix(state["prefix"],
                                             ops.kv_head_sums(q_rotated, k.shape[2]), q_index)
    state["block_keys"] = policies.freeze_block_keys(
        state["block_keys"], state["prefix"], k_cache, q_index[0], q_index[-1],
        window=policy.window, block=policy.block, representatives=policy.representatives,
        chunk=c, rotate=rotate, gather=gather)
    selected, valid = policies.infllm_select(
        state["block_keys"], q_far, q_index, top_blocks=policy.top_k // policy.block,
        block=policy.block, sinks=policy.sinks, window=policy.window)
    run = policy.block
  else:
    (selected, valid), cached = policies.tokenselect_select(
        (state["last_q"], state["last_ids"], state["has_last"]), q_far,
        state["keys_by_head"].astype(q.dtype), q_index,
        top_k=state["last_ids"].shape[-1], sinks=policy.sinks, window=policy.window,
        reuse_threshold=policy.reuse)
    state["last_q"], state["last_ids"], state["has_last"] = cached
    run = 1
  parts = _far_parts(q_index, k_cache, v_cache, policy, b, gather)
  if policy.hot_blocks and c == 1:  # a decode step of an offloaded cache: through the LRU
    part, state = _hot_selection(state, selected, valid, k_cache, v_cache, policy, q_index[0],
                                 gather)
  else:
    part = (gather(k_cache, selected, run), gather(v_cache, selected, run), valid)
  far = ops.far_attention(q_far, parts + [part], impl=impl)
  return (ring_k, ring_v, state), merge_attention([local, far])[0].astype(q.dtype)


def retrieval_decode(q, k, v, cache: caches.RetrievalCache, policy: RetrievalPolicy, *,
                     rotate, scale_queries=None, impl: str = "auto", dtype=jnp.float32):
  """Writes T new tokens to the cache and attends them through the policy, in chunks of
  `policy.chunk` queries (a prefill) or one (a decode step).

  Args:
    q: [B, T, N, H] unrotated queries; k, v: [B, T, K, H] unrotated keys and values; the
      tokens sit at cache indices end..end+T-1, which are also their positions.
    cache: from `init_cache`.
    rotate: (x, positions, is_key) -> x rotated by the layer's encoding.
    scale_queries: (q, positions) -> q (log-n scaling) or None.
    impl: `dot_product_attention`'s implementation for both parts.

  Returns:
    (out [B, T, N, H], the updated cache).
  """
  end, t = cache.end, q.shape[1]
  state = dict(cache.policy)
  index = end + jnp.arange(t, dtype=jnp.int32)
  k_new, v_new = k, v
  if policy.name == "duo":  # the cache keeps the retrieval heads whole, all heads' sinks
    k_new, v_new = k[:, :, state["heads"]], v[:, :, state["heads"]]
    slot = jnp.where(index < policy.sinks, index, policy.sinks)
    state["sink_k"] = state["sink_k"].at[:, slot].set(k.astype(cache.k.dtype), mode="drop")
    state["sink_v"] = state["sink_v"].at[:, slot].set(v.astype(cache.v.dtype), mode="drop")
  if policy.placement == "host":
    k_cache, v_cache = ops.host_write(cache.k, k_new, end), ops.host_write(cache.v, v_new, end)
  else:
    k_cache = jax.lax.dynamic_update_slice(cache.k, k_new.astype(cache.k.dtype), (0, end, 0, 0))
    v_cache = jax.lax.dynamic_update_slice(cache.v, v_new.astype(cache.v.dtype), (0, end, 0, 0))
  if "keys_by_head" in state:
    state["keys_by_head"] = jax.lax.dynamic_update_slice(
        state["keys_by_head"], jnp.moveaxis(k, 1, 2).astype(cache.k.dtype), (0, 0, end, 0))
  cast = (lambda x: x) if policy.placement == "host" else (lambda x: x.astype(dtype))
  step = functools.partial(_chunk, k_cache=cast(k_cache), v_cache=cast(v_cache),
                           policy=policy, rotate=rotate, scale_queries=scale_queries, impl=impl)
  carry = (cache.ring_k, cache.ring_v, state)
  chunk = min(policy.chunk, t)
  full, rest = divmod(t, chunk)
  outs = []
  if full:  # whole chunks in a scan, then the rest as one shorter chunk
    def body(carry, xs):
      return step(carry, *xs)
    split = lambda x: jnp.moveaxis(x[:, :full * chunk].reshape(
        x.shape[0], full, chunk, *x.shape[2:]), 1, 0)
    carry, out = jax.lax.scan(body, carry, (split(q), split(k), split(v),
                                            index[:full * chunk].reshape(full, chunk)))
    outs.append(jnp.moveaxis(out, 0, 1).reshape(q.shape[0], full * chunk, *q.shape[2:]))
  if rest:
    carry, out = step(carry, q[:, full * chunk:], k[:, full * chunk:], v[:, full * chunk:],
                      index[full * chunk:])
    outs.append(out)
  ring_k, ring_v, state = carry
  return (jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0],
          caches.RetrievalCache(k=k_cache, v=v_cache, ring_k=ring_k, ring_v=ring_v,
                                end=end + t, policy=state))
