"""The `retrieval*` fields of `config.model.attention` (the training-free retrieval policies of
`longjax.layers.retrieval`): defaults, the one place their rules are checked, DuoAttention's
head-split syntax and `RetrievalPolicy`, the fields as an attention layer keeps them."""

import dataclasses

import ml_collections

from longjax import posenc
from longjax.errors import ConfigError
from longjax.layers.positional import POSENCS

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
