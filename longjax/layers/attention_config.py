"""Softmax attention's config section (`config.model.attention`): defaults, the one place its
rules are checked, and the factory of `longjax.layers.attention.Attention`. See `SPEC`."""

import ml_collections

from longjax import posenc
from longjax.errors import ConfigError
from longjax.layers import caches
from longjax.layers import dims
from longjax.layers import retrieval_config
from longjax.layers.attention import NORMALIZERS, Attention
from longjax.layers.mixer import MixerSpec
from longjax.layers.positional import POSENCS
from longjax.ops import attention as attention_ops
from longjax.ops.softplus_attention import SOFTPLUS_ATTENTION


def defaults() -> ml_collections.ConfigDict:
  a = ml_collections.ConfigDict()
  a.impl = "auto"   # auto | reference | blockwise | pallas | cpu | splash | cudnn
  a.block_size = 0  # blockwise key/query block; 0 = the op's default
  a.log_scaling_length = 0  # L > 0: logits x max(1, log_L(position + 1))
  a.window = 0      # > 0: sliding-window attention over this many keys
  a.sink_tokens = 0  # with a window: first k keys always visible; streaming cache
  a.distance_ceiling = 0  # with sinks: far global keys sit this far (LM-Infinite)
  a.normalizer = "softmax"  # softmax | softplus (l1-normalised, arXiv 2501.13428)
  a.softplus_length_scale = True  # softplus: cosine logits x log(H) log(N) (LSSA)
  a.reweight_power = 0.0  # softplus: p >= 1 re-weights (LSSAR; paper: 15); 0 = off
  a.learned_sink = False  # a learned key/value every query sees (StreamingLLM)
  retrieval_config.add_defaults(a)  # retrieval*: InfLLM / TokenSelect when decoding
  return a


def _choice(field: str, value, choices):
  if value not in choices:
    raise ConfigError(field, value, "unknown choice", sorted(choices))


def validate(model, a, prefix: str = "model.attention") -> None:
  """Raises ConfigError for the first bad field of the attention section `a` of `model`."""
  _choice(f"{prefix}.impl", a.impl, attention_ops.IMPLS)
  if a.log_scaling_length < 0 or a.log_scaling_length == 1:
    raise ConfigError(f"{prefix}.log_scaling_length", a.log_scaling_length,
                      "must be 0 (off) or the training length >= 2")
  if a.window < 0:
    raise ConfigError(f"{prefix}.window", a.window, "must be >= 0 (0 = full causal attention)")
  if a.sink_tokens < 0 or (a.sink_tokens and not a.window):
    raise ConfigError(f"{prefix}.sink_tokens", a.sink_tokens,
                      f"must be >= 0, and > 0 only with {prefix}.window > 0")
  if a.distance_ceiling < 0 or (a.distance_ceiling and not a.sink_tokens):
    raise ConfigError(f"{prefix}.distance_ceiling", a.distance_ceiling,
                      f"must be >= 0, and > 0 only with {prefix}.sink_tokens > 0")
  p = model.posenc
  length_dependent = (p.kind == "clex" or p.scaling in posenc.rope_scaling.DYNAMIC_SCALINGS)
  if a.distance_ceiling and length_dependent:
    # The far global part rotates queries at the ceiling: a length-dependent encoding would
    # derive a different context length there than in the local part.
    raise ConfigError(f"{prefix}.distance_ceiling", a.distance_ceiling,
                      "cannot be combined with an encoding whose frequencies depend on the "
                      f"context length (model.posenc.kind={p.kind!r}, scaling={p.scaling!r})")
  if a.block_size < 0:
    raise ConfigError(f"{prefix}.block_size", a.block_size,
                      "must be >= 0 (0 = the op's default)")
  _validate_normalizer(a, prefix)
  _validate_impl(model, a, prefix)
  if a.learned_sink and (a.normalizer != "softmax" or a.distance_ceiling):
    raise ConfigError(f"{prefix}.learned_sink", a.learned_sink,
                      f"needs softmax attention without distance_ceiling ({prefix}."
                      f"normalizer={a.normalizer!r}, distance_ceiling={a.distance_ceiling})",
                      [False])
  retrieval_config.validate(model, a, prefix)
  # The blockwise XLA implementation pads any length to its block size; a block-size rule for
  # lengths belongs here once an implementation requires one (the Pallas kernels).


def _validate_normalizer(a, prefix: str) -> None:
  """Fields of softplus attention (LSSA / LSSAR, arXiv 2501.13428)."""
  _choice(f"{prefix}.normalizer", a.normalizer, NORMALIZERS)
  power = a.reweight_power
  # The paper sharpens with p >= 1 (3 and 15); 0 < p < 1 would flatten instead.
  if not isinstance(power, (int, float)) or not (power == 0 or power >= 1):
    raise ConfigError(f"{prefix}.reweight_power", power, "must be 0 (off) or >= 1")
  if power and a.normalizer != "softplus":
    raise ConfigError(f"{prefix}.reweight_power", power,
                      f"re-weights softplus attention, but {prefix}.normalizer="
                      f"{a.normalizer!r}", [0])
  if a.normalizer != "softplus":
    return
  for name in ("distance_ceiling", "sink_tokens"):
    if a[name]:
      # The streaming and LM-Infinite paths merge softmax pieces by log-sum-exp; softplus
      # rows would need their own merge rule.
      raise ConfigError(f"{prefix}.{name}", a[name],
                        "streaming and LM-Infinite attention are softmax-only, but "
                        f"{prefix}.normalizer='softplus'", [0])
  if a.softplus_length_scale and a.log_scaling_length:
    # LSSA l2-normalises the queries, which would undo the log-n query scaling.
    raise ConfigError(f"{prefix}.log_scaling_length", a.log_scaling_length,
                      f"cannot be combined with {prefix}.softplus_length_scale, which "
                      "scales the logits by log(N) itself", [0])


def _validate_impl(model, a, prefix: str) -> None:
  """An explicit `impl` must be able to serve this layer's maths and the positional bias."""
  impl, kind = a.impl, model.posenc.kind
  softplus_impls = SOFTPLUS_ATTENTION.choices
  if a.normalizer != "softmax" and impl not in softplus_impls:
    raise ConfigError(f"{prefix}.impl", impl,
                      f"has no softplus kernel ({prefix}.normalizer={a.normalizer!r})",
                      softplus_impls)
  # The Pallas flash kernel computes every logit bias (ALiBi, T5, KERPLE, FIRE) in-kernel.
  if impl in ("splash", "cudnn") and POSENCS[kind].logit_bias:
    raise ConfigError(f"{prefix}.impl", impl, f"takes no position bias (model.posenc."
                      f"kind={kind!r}); 'auto' picks longjax's kernels for it",
                      ["auto", "pallas", "blockwise", "reference"])
  if impl == "cpu":
    if POSENCS[kind].logit_bias and kind != "alibi":
      raise ConfigError(f"{prefix}.impl", "cpu", "computes no position bias but ALiBi "
                        f"(model.posenc.kind={kind!r}); 'auto' picks blockwise for such "
                        "encodings", ["auto", "reference", "blockwise", "pallas"])
    reason = attention_ops.cpu_unsupported(None, dims.head_dim(model))
    if reason is not None:
      raise ConfigError(f"{prefix}.impl", "cpu", f"cannot run here: {reason}",
                        ["auto", "reference", "blockwise"])


def build(model, a, rngs) -> Attention:
  """The `Attention` module of one layer: shared sizes from `model`, its own section `a`."""
  return Attention(model.width, model.num_heads, dims.num_kv_heads(model), dims.head_dim(model),
                   positional=POSENCS[model.posenc.kind].attention(model, rngs),
                   impl=a.impl, block_size=a.block_size,
                   log_scaling_length=a.log_scaling_length, window=a.window,
                   sink_tokens=a.sink_tokens, distance_ceiling=a.distance_ceiling,
                   normalizer=a.normalizer, softplus_length_scale=a.softplus_length_scale,
                   reweight_power=a.reweight_power, learned_sink=a.learned_sink,
                   retrieval_policy=retrieval_config.RetrievalPolicy.from_config(a),
                   out_init_scale=dims.out_init_scale(model), dtype=dims.DTYPES[model.dtype],
                   rngs=rngs)


SPEC = MixerSpec(name="attention", aliases=("attn",), section="attention", defaults=defaults,
                 validate=validate, build=build,
                 cache_types=(caches.KVCache, caches.RollingCache, caches.RetrievalCache),
                 evaluates_with_cache=lambda a: a.retrieval != "none")
