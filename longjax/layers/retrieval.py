"""Training-free retrieval policies for softmax attention layers: the `retrieval*` fields of
`config.model.attention`, the policy's cache and its decode step.

A policy changes nothing in training. It applies whenever the layer runs with a cache
(`experiments.sample`, and `experiments.evaluate`, which then evaluates through a prefill into
the cache as the model decodes): every query attends to the first `retrieval_sinks` tokens, its
last `retrieval_window` tokens and `retrieval_top_k` tokens the policy selects from the rest
(`longjax.ops.retrieval`, `longjax.ops.retrieval_policies`). So any trained attention model
can be evaluated with InfLLM or TokenSelect by a config override, e.g.

    python -m experiments.evaluate --workdir=runs/x --config.model.attention.retrieval=infllm \
        --config.model.attention.retrieval_window=512
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections

from longjax import posenc
from longjax.errors import ConfigError
from longjax.layers import caches
from longjax.layers.positional import POSENCS
from longjax.ops import AttentionMask
from longjax.ops import block_lru
from longjax.ops import dot_product_attention
from longjax.ops import merge_attention
from longjax.ops import retrieval as ops
from longjax.ops import retrieval_policies as policies

POLICIES = ("none", "infllm", "tokenselect", "hip", "duo")
BLOCK_POLICIES = ("infllm", "hip")  # select whole blocks of retrieval_block tokens
PLACEMENTS = ("device", "host")  # where the whole cache's keys and values live


def add_defaults(a: ml_collections.ConfigDict) -> None:
  """The retrieval fields of the attention section `a` (flat, so that a layer of the pattern
  can override them: "attention(retrieval=infllm),attention")."""
  a.retrieval = "none"         # none | infllm | tokenselect | hip | duo (when decoding)
  a.retrieval_top_k = 2048     # tokens selected per query (infllm: top_k / block blocks)
  a.retrieval_window = 2048    # local window: the last tokens, at their true distances
  a.retrieval_sinks = 128      # initial tokens every query sees (infllm: a multiple of block)
  a.retrieval_block = 128      # infllm, hip: tokens per block retrieved
  a.retrieval_representatives = 4  # infllm: representative keys per unit
  a.retrieval_reuse = 0.9      # tokenselect: reuse the selection from this query cosine on
  a.retrieval_chunk = 128      # queries per step of a prefill
  a.retrieval_cache = "device"  # infllm, hip: "host" keeps the keys and values in host memory
  a.retrieval_hot_blocks = 0   # host: device LRU of this many blocks for decoding (0 = none)
  a.retrieval_heads = 0.5      # duo: fraction of KV heads kept as retrieval heads
  a.retrieval_head_split = ""  # duo: "layer:head,head;..." retrieval heads ("" = calibrate)


def validate(model, a, prefix: str) -> None:
  """Raises ConfigError for the first bad retrieval field of the attention section `a`."""
  if a.retrieval not in POLICIES:
    raise ConfigError(f"{prefix}.retrieval", a.retrieval, "unknown choice", list(POLICIES))
  if a.retrieval == "none":
    return
  for name in ("top_k", "window", "chunk"):
    value = a[f"retrieval_{name}"]
    if not isinstance(value, int) or value < 1:
      raise ConfigError(f"{prefix}.retrieval_{name}", value, "must be an int >= 1")
  if not isinstance(a.retrieval_sinks, int) or a.retrieval_sinks < 0:
    raise ConfigError(f"{prefix}.retrieval_sinks", a.retrieval_sinks, "must be an int >= 0")
  if a.retrieval in BLOCK_POLICIES:
    block = a.retrieval_block
    if not isinstance(block, int) or block < 1:
      raise ConfigError(f"{prefix}.retrieval_block", block, "must be an int >= 1")
    for name in ("top_k", "sinks"):
      if a[f"retrieval_{name}"] % block:
        raise ConfigError(f"{prefix}.retrieval_{name}", a[f"retrieval_{name}"],
                          f"must be a multiple of {prefix}.retrieval_block={block} "
                          f"({a.retrieval} retrieves whole blocks)")
    reps = a.retrieval_representatives
    if a.retrieval == "infllm" and (not isinstance(reps, int) or not 1 <= reps <= block):
      raise ConfigError(f"{prefix}.retrieval_representatives", reps,
                        f"must be an int in [1, retrieval_block={block}]")
  if a.retrieval_cache not in PLACEMENTS:
    raise ConfigError(f"{prefix}.retrieval_cache", a.retrieval_cache, "unknown choice",
                      list(PLACEMENTS))
  if a.retrieval_cache == "host" and a.retrieval not in BLOCK_POLICIES:
    raise ConfigError(f"{prefix}.retrieval_cache", "host", f"offloads the cache of a block "
                      f"policy {BLOCK_POLICIES}, which reads a few blocks of it per step; "
                      f"{prefix}.retrieval={a.retrieval!r} reads it whole", ["device"])
  hot = a.retrieval_hot_blocks
  if hot and (a.retrieval_cache != "host" or not isinstance(hot, int)
              or hot < a.retrieval_top_k // a.retrieval_block):
    raise ConfigError(f"{prefix}.retrieval_hot_blocks", hot, "must be 0, or with "
                      f"{prefix}.retrieval_cache='host' an int >= the blocks a step selects "
                      f"(retrieval_top_k / retrieval_block = "
                      f"{a.retrieval_top_k // max(a.retrieval_block, 1)})")
  if a.retrieval == "duo":
    if not isinstance(a.retrieval_heads, (int, float)) or not 0 < a.retrieval_heads <= 1:
      raise ConfigError(f"{prefix}.retrieval_heads", a.retrieval_heads,
                        "must be a fraction in (0, 1] (of the KV heads kept whole)")
    try:
      split = parse_head_split(a.retrieval_head_split)
    except ValueError as e:
      raise ConfigError(f"{prefix}.retrieval_head_split", a.retrieval_head_split, str(e)
                        ) from None
    kv_heads = model.num_kv_heads or model.num_heads
    for layer, heads in split.items():
      if not 0 <= layer < model.num_layers or any(not 0 <= h < kv_heads for h in heads):
        raise ConfigError(f"{prefix}.retrieval_head_split", a.retrieval_head_split,
                          f"names layer {layer} head(s) {list(heads)}: layers are 0.."
                          f"{model.num_layers - 1}, KV heads 0..{kv_heads - 1}")
  if not isinstance(a.retrieval_reuse, (int, float)):
    raise ConfigError(f"{prefix}.retrieval_reuse", a.retrieval_reuse,
                      "must be a number: a cosine similarity (above 1: never reuse)")
  for name in ("window", "sink_tokens", "distance_ceiling"):
    if a[name]:
      raise ConfigError(f"{prefix}.{name}", a[name], f"is another decoding scheme than "
                        f"{prefix}.retrieval={a.retrieval!r}; use retrieval_window and "
                        "retrieval_sinks", [0])
  if a.normalizer != "softmax" or a.learned_sink:
    raise ConfigError(f"{prefix}.retrieval", a.retrieval,
                      "needs plain softmax attention (normalizer='softmax', no learned_sink)",
                      ["none"])
  p = model.posenc
  if POSENCS[p.kind].logit_bias:
    # Far keys are moved to the window's distance by rotating the query; a logit bias would
    # need its own distances for the gathered keys.
    raise ConfigError("model.posenc.kind", p.kind, f"{prefix}.retrieval={a.retrieval!r} takes "
                      "rotary or no position encodings, not a logit bias",
                      sorted(k for k, e in POSENCS.items() if not e.logit_bias))
  if p.kind == "clex" or p.scaling in posenc.rope_scaling.DYNAMIC_SCALINGS:
    raise ConfigError(f"{prefix}.retrieval", a.retrieval, "needs frequencies that do not "
                      "depend on the context length (model.posenc)", ["none"])


def parse_head_split(text: str) -> dict[int, tuple[int, ...]]:
  """DuoAttention's head split, "0:1,3;1:;2:0" -> {0: (1, 3), 1: (), 2: (0,)}: each layer's
  retrieval KV heads (a listed layer with none keeps only streaming heads). "" -> {} (every
  head of every layer a retrieval head: what the calibration runs). ValueError when malformed."""
  split = {}
  for item in filter(None, (p.strip() for p in text.split(";"))):
    layer, colon, heads = item.partition(":")
    try:
      if not colon:
        raise ValueError
      ids = tuple(sorted(int(h) for h in heads.split(",") if h.strip()))
      layer = int(layer)
    except ValueError:
      raise ValueError(f"{item!r} is not layer:head,head,... (e.g. '0:1,3;1:0')") from None
    if layer in split or len(set(ids)) != len(ids):
      raise ValueError(f"layer {layer} or one of its heads is named twice")
    split[layer] = ids
  return split


def format_head_split(split: dict[int, tuple[int, ...]]) -> str:
  """The inverse of `parse_head_split`."""
  return ";".join(f"{layer}:{','.join(map(str, heads))}" for layer, heads in sorted(split.items()))


@dataclasses.dataclass(frozen=True)
class RetrievalPolicy:
  """The retrieval fields of one layer, as the module keeps them (see `add_defaults`)."""
  name: str
  top_k: int
  window: int
  sinks: int
  block: int
  representatives: int
  reuse: float
  chunk: int
  head_split: tuple[tuple[int, tuple[int, ...]], ...] = ()  # duo: (layer, retrieval heads)
  placement: str = "device"  # "host": keys and values in host memory (block policies)
  hot_blocks: int = 0  # with "host": the device LRU's blocks (0: none)

  @classmethod
  def from_config(cls, a) -> "RetrievalPolicy | None":
    if a.retrieval == "none":
      return None
    return cls(a.retrieval, a.retrieval_top_k, a.retrieval_window, a.retrieval_sinks,
               a.retrieval_block, a.retrieval_representatives, a.retrieval_reuse,
               a.retrieval_chunk, tuple(parse_head_split(a.retrieval_head_split).items()),
               a.retrieval_cache, a.retrieval_hot_blocks)

  @property
  def align(self) -> int:
    return self.block if self.name in BLOCK_POLICIES else 1


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


def _duo_far(q_far, q_index, k_cache, v_cache, state, *, window: int, impl: str):
  """DuoAttention's far parts, both at the window's distance: the sinks for streaming heads and
  every key before the window for retrieval heads (whose cache holds only those heads).

  Returns:
    ([(out [B, C, N, H], lse [B, N, C])] pieces over all N heads, lse -inf where a piece does
    not apply; the retrieval heads' piece's lse (for the calibration statistic) or None).
  """
  b, c, n, h = q_far.shape
  kv_heads = state["sink_k"].shape[2]
  group = n // kv_heads
  heads = state["heads"]  # [Kr] retrieval KV heads
  query_heads = (heads[:, None] * group + jnp.arange(group)).reshape(-1)  # [Kr * G]
  retrieval = jnp.zeros((n,), bool).at[query_heads].set(True)
  seen = (q_index >= window)[None, None, :]  # any key before the window at all
  # Keys j <= t - window: causal masking with the queries moved `window` back.
  mask = AttentionMask(causal=True, q_offset=q_index[0] - window)
  pieces = []
  if state["sink_k"].shape[1]:
    out, lse = dot_product_attention(q_far, state["sink_k"].astype(q_far.dtype),
                                     state["sink_v"].astype(q_far.dtype), mask=mask, impl=impl,
                                     return_lse=True)
    keep = seen & ~retrieval[None, :, None]
    pieces.append((jnp.where(keep.transpose(0, 2, 1)[..., None], out, 0.0),
                   jnp.where(keep, lse, -jnp.inf)))
  if heads.shape[0] == 0:
    return pieces, None
  out, lse = dot_product_attention(q_far[:, :, query_heads], k_cache, v_cache, mask=mask,
                                   impl=impl, return_lse=True)
  out = jnp.where(seen.transpose(0, 2, 1)[..., None], out, 0.0)
  lse = jnp.where(seen, lse, -jnp.inf)
  pieces.append((jnp.zeros((b, c, n, h), jnp.float32).at[:, :, query_heads].set(out),
                 jnp.full((b, n, c), -jnp.inf).at[:, query_heads].set(lse)))
  return pieces, lse


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
  b, c, n, h = q.shape
  kv_heads = k.shape[2]
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
    pieces, lse_retrieval = _duo_far(q_far, q_index, k_cache, v_cache, state,
                                     window=policy.window, impl=impl)
    out, lse = merge_attention([local, *pieces])
    if lse_retrieval is not None:  # the retrieval heads' weight on keys before the window
      heads = state["heads"]
      group = n // kv_heads
      query_heads = (heads[:, None] * group + jnp.arange(group)).reshape(-1)
      weight = jnp.exp(lse_retrieval - lse[:, query_heads])  # [B, Kr * G, C]
      state["distant_mass"] = state["distant_mass"] + weight.reshape(
          b, heads.shape[0], group * c).sum(-1)
    return (ring_k, ring_v, state), out.astype(q.dtype)
  if policy.name == "hip":
    selected, valid = policies.hip_select(q_far, k_cache, q_index,
                                          top_blocks=policy.top_k // policy.block,
                                          block=policy.block, sinks=policy.sinks,
                                          window=policy.window, gather=gather)
    run = policy.block
  elif policy.name == "infllm":
    q_sum = q_rotated.reshape(b, c, kv_heads, -1, h).sum(axis=3)
    state["prefix"] = policies.update_prefix(state["prefix"], q_sum, q_index)
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
