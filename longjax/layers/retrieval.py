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

import jax
import jax.numpy as jnp
import ml_collections

from longjax import posenc
from longjax.errors import ConfigError
from longjax.layers import caches
from longjax.layers.positional import POSENCS
from longjax.ops import retrieval as ops
from longjax.ops import retrieval_policies as policies

POLICIES = ("none", "infllm", "tokenselect")
BLOCK_POLICIES = ("infllm",)  # select whole blocks of retrieval_block tokens


def add_defaults(a: ml_collections.ConfigDict) -> None:
  """The retrieval fields of the attention section `a` (flat, so that a layer of the pattern
  can override them: "attention(retrieval=infllm),attention")."""
  a.retrieval = "none"         # none | infllm | tokenselect (applies when decoding)
  a.retrieval_top_k = 2048     # tokens selected per query (infllm: top_k / block blocks)
  a.retrieval_window = 2048    # local window: the last tokens, at their true distances
  a.retrieval_sinks = 128      # initial tokens every query sees (infllm: a multiple of block)
  a.retrieval_block = 128      # infllm: tokens per memory unit
  a.retrieval_representatives = 4  # infllm: representative keys per unit
  a.retrieval_reuse = 0.9      # tokenselect: reuse the selection from this query cosine on
  a.retrieval_chunk = 128      # queries per step of a prefill


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
    if not isinstance(reps, int) or not 1 <= reps <= block:
      raise ConfigError(f"{prefix}.retrieval_representatives", reps,
                        f"must be an int in [1, retrieval_block={block}]")
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

  @classmethod
  def from_config(cls, a) -> "RetrievalPolicy | None":
    if a.retrieval == "none":
      return None
    return cls(a.retrieval, a.retrieval_top_k, a.retrieval_window, a.retrieval_sinks,
               a.retrieval_block, a.retrieval_representatives, a.retrieval_reuse,
               a.retrieval_chunk)

  @property
  def align(self) -> int:
    return self.block if self.name in BLOCK_POLICIES else 1


def init_cache(policy: RetrievalPolicy, batch_size: int, max_length: int, num_heads: int,
               num_kv_heads: int, head_dim: int, dtype) -> caches.RetrievalCache:
  """An empty cache for `max_length` tokens (InfLLM: rounded up to whole blocks)."""
  length = -(-max_length // policy.align) * policy.align
  shape = (batch_size, length, num_kv_heads, head_dim)
  if policy.name == "infllm":
    state = {"scores": jnp.zeros((batch_size, num_kv_heads, length), jnp.float32),
             "representatives": jnp.zeros((batch_size, num_kv_heads, length // policy.block,
                                           policy.representatives, head_dim), dtype)}
  else:
    state = {"last_q": jnp.zeros((batch_size, num_heads, head_dim), dtype),
             "last_ids": jnp.full((batch_size, min(policy.top_k, length)), -1, jnp.int32),
             "has_last": jnp.zeros((), bool)}
  return caches.RetrievalCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                               end=jnp.zeros((), jnp.int32), policy=state)


def retrieval_decode(q, k, v, cache: caches.RetrievalCache, policy: RetrievalPolicy, *,
                     rotate, scale_queries=None, dtype=jnp.float32):
  """Writes T new tokens to the cache and attends them through the policy.

  Args:
    q: [B, T, N, H] unrotated queries; k, v: [B, T, K, H] unrotated keys and values; the
      tokens sit at cache indices end..end+T-1, which are also their positions.
    cache: from `init_cache`.
    rotate: (x, positions, is_key) -> x rotated by the layer's encoding.
    scale_queries: (q, positions) -> q (log-n scaling) or None.

  Returns:
    (out [B, T, N, H], the updated cache).
  """
  end, t = cache.end, q.shape[1]
  index = end + jnp.arange(t, dtype=jnp.int32)
  k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, end, 0, 0))
  v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, end, 0, 0))
  k_use, v_use = k_all.astype(dtype), v_all.astype(dtype)
  state = dict(cache.policy)
  select_state = None
  if policy.name == "infllm":
    state["scores"] = policies.accumulate_scores(state["scores"], q, k_use, index,
                                                 window=policy.window, rotate=rotate,
                                                 chunk=policy.chunk)
    state["representatives"] = policies.freeze_representatives(
        state["representatives"], state["scores"], k_all, end, end + t, window=policy.window,
        block=policy.block, new_tokens=t)
    select = policies.infllm_select(state["representatives"],
                                    top_blocks=policy.top_k // policy.block, block=policy.block,
                                    sinks=policy.sinks, window=policy.window)
  else:
    select = policies.tokenselect_select(k_use, top_k=policy.top_k, sinks=policy.sinks,
                                         window=policy.window, reuse_threshold=policy.reuse,
                                         scale=q.shape[-1] ** -0.5)
    select_state = (state["last_q"], state["last_ids"], state["has_last"])
  out, select_state = ops.retrieval_attention(
      q, k_use, v_use, index, window=policy.window, sinks=policy.sinks, align=policy.align,
      select=select, select_state=select_state, rotate=rotate, scale_queries=scale_queries,
      chunk=policy.chunk)
  if policy.name == "tokenselect":
    state["last_q"], state["last_ids"], state["has_last"] = select_state
  return out, caches.RetrievalCache(k=k_all, v=v_all, end=end + t, policy=state)
