"""Registries that map `config.model` names to modules.

Adding a mixer is one module in `longjax/layers` and one line in `MIXERS`; adding a positional
encoding is one line in `longjax.layers.positional.POSENCS`.
"""

from collections.abc import Callable

from flax import nnx
import jax.numpy as jnp

from longjax.layers.attention import Attention
from longjax.layers.positional import POSENCS

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def head_dim(cfg) -> int:
  return cfg.head_dim or cfg.width // cfg.num_heads


def num_kv_heads(cfg) -> int:
  return cfg.num_kv_heads or cfg.num_heads


def out_init_scale(cfg) -> float:
  # Residual-branch outputs start 1/sqrt(2L) smaller (GPT-2), so the residual stream's variance
  # at initialisation does not grow with depth.
  return 1.0 / (2.0 * cfg.num_layers)


def _attention(cfg, rngs: nnx.Rngs) -> Attention:
  return Attention(cfg.width, cfg.num_heads, num_kv_heads(cfg), head_dim(cfg),
                   positional=POSENCS[cfg.posenc.kind].attention(cfg, rngs),
                   impl=cfg.attention.impl, block_size=cfg.attention.block_size,
                   log_scaling_length=cfg.attention.log_scaling_length,
                   window=cfg.attention.window, sink_tokens=cfg.attention.sink_tokens,
                   distance_ceiling=cfg.attention.distance_ceiling,
                   normalizer=cfg.attention.normalizer,
                   softplus_length_scale=cfg.attention.softplus_length_scale,
                   reweight_power=cfg.attention.reweight_power,
                   learned_sink=cfg.attention.learned_sink,
                   out_init_scale=out_init_scale(cfg), dtype=DTYPES[cfg.dtype], rngs=rngs)


# Mixer name -> factory(model config, rngs) -> module with the mixer interface.
MIXERS: dict[str, Callable[..., nnx.Module]] = {
    "attention": _attention,
}
MIXER_ALIASES = {"attn": "attention"}


def parse_mixers(spec: str) -> list[str]:
  """'attn,attention' -> ['attention', 'attention'], canonical names.

  Raises:
    ValueError naming the unknown entry and the valid choices.
  """
  names = [s.strip() for s in spec.split(",") if s.strip()]
  if not names:
    raise ValueError("model.mixers is empty; valid mixers: " + ", ".join(sorted(MIXERS)))
  out = []
  for name in names:
    canonical = MIXER_ALIASES.get(name, name)
    if canonical not in MIXERS:
      raise ValueError(f"model.mixers: unknown mixer {name!r}; valid: "
                       + ", ".join(sorted(MIXERS) + sorted(MIXER_ALIASES)))
    out.append(canonical)
  return out
