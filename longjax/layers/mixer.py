"""The mixer seam: each sequence mixer declares one `MixerSpec`, and the model's layer pattern
names mixers (with per-layer overrides of their config fields).

A mixer module (softmax attention, linear attention, an SSM, ...) owns its config: the spec
gives its section of `config.model` with defaults, the validation of that section (one-line
`ConfigError`s), the factory that builds the NNX module, and the cache types its decode path
uses. `longjax.defaults`, `longjax.configuration` and `DecoderLM` loop over the registry
(`longjax.models.registry.MIXERS`) and know no mixer by name.

The pattern `config.model.mixers` is a comma-separated list of entries, repeated to
`model.num_layers`; an entry is a mixer name, optionally with overrides of its section for that
layer only: `"attention(window=256),attention"` alternates sliding-window and full attention.
"""

from collections.abc import Callable
import dataclasses
import re

import ml_collections

from longjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class MixerSpec:
  """What the model and the config system need to know about one mixer.

  Attributes:
    name: its name in `model.mixers`.
    section: its fields live in `config.model.<section>`.
    defaults: () -> ConfigDict of the section's fields with their defaults.
    validate: (model config, section config, field prefix) -> None; raises ConfigError naming
      `<prefix>.<field>`. The model config gives the shared sizes and the positional encoding.
    build: (model config, section config, rngs) -> the NNX module with the mixer interface
      (`y, cache = mixer(x, positions=..., segment_ids=..., cache=None)`, `init_cache`).
    cache_types: the dataclasses its `init_cache` may return (`longjax.layers.caches`).
    aliases: other names accepted in `model.mixers`.
    landmark_block: (section config) -> the block size of the landmark tokens its layers need
      in the sequence (`longjax.ops.landmarks`), or None for a mixer that needs none. The model
      inserts them once for all layers, so every such layer must name the same block size.
    evaluates_with_cache: (section config) -> whether its layers behave, at evaluation time,
      as they decode from a cache rather than as in training (retrieval from a long cache:
      landmark attention, attention with a retrieval policy).
      `experiments.evaluate` then evaluates through a prefill into the cache.
  """
  name: str
  section: str
  defaults: Callable[[], ml_collections.ConfigDict]
  validate: Callable[..., None]
  build: Callable[..., object]
  cache_types: tuple[type, ...]
  aliases: tuple[str, ...] = ()
  landmark_block: Callable[[ml_collections.ConfigDict], int] | None = None
  evaluates_with_cache: Callable[[ml_collections.ConfigDict], bool] | None = None


@dataclasses.dataclass(frozen=True)
class MixerEntry:
  """One entry of the layer pattern: a mixer and its per-layer field overrides."""
  spec: MixerSpec
  overrides: tuple[tuple[str, object], ...] = ()
  text: str = ""  # as written in model.mixers, for messages

  def config(self, model) -> ml_collections.ConfigDict:
    """The mixer's section of `model` with this entry's overrides applied."""
    section = model[self.spec.section].copy_and_resolve_references()
    with section.unlocked():
      for field, value in self.overrides:
        section[field] = value
    return section

  def field_prefix(self, index: int) -> str:
    """Where its fields are named in messages: the shared section, or this layer's entry."""
    if not self.overrides:
      return f"model.{self.spec.section}"
    return f"model.mixers[{index}]:{self.spec.section}"


_ENTRY = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*(?:\((.*)\))?\s*$", re.S)


def _split_top_level(text: str) -> list[str]:
  """Splits on commas outside parentheses."""
  parts, depth, start = [], 0, 0
  for i, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if char == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:])
  return [p for p in (p.strip() for p in parts) if p]


def _parse_value(text: str, default, where: str):
  """An override value, typed like the field's default."""
  text = text.strip()
  try:
    if isinstance(default, bool):
      if text.lower() not in ("true", "false"):
        raise ValueError
      return text.lower() == "true"
    if isinstance(default, int):
      return int(text)
    if isinstance(default, float):
      return float(text)
  except ValueError:
    raise ConfigError("model.mixers", where, f"{text!r} is not a {type(default).__name__}"
                      ) from None
  return text.strip("'\"")


def landmark_block(pattern: list[MixerEntry], model) -> int:
  """The landmark block size the layers of `pattern` need, 0 for none.

  Raises:
    ConfigError when two layers need different block sizes.
  """
  sizes = {entry.spec.landmark_block(entry.config(model)): entry.text for entry in pattern
           if entry.spec.landmark_block is not None}
  if len(sizes) > 1:
    raise ConfigError("model.mixers", model.mixers, "every landmark layer must use the same "
                      f"block_size (the model inserts one landmark sequence), got {sorted(sizes)}")
  return next(iter(sizes), 0)


def parse_pattern(spec: str, mixers: dict[str, MixerSpec], model=None) -> list[MixerEntry]:
  """'attention(window=8),attn' -> two MixerEntry; ConfigError naming a bad entry.

  Args:
    spec: `model.mixers`.
    mixers: name -> MixerSpec (the registry).
    model: `config.model`, to type overrides by their defaults; None uses each spec's defaults.
  """
  by_name = {alias: s for s in mixers.values() for alias in (s.name, *s.aliases)}
  entries = []
  for text in _split_top_level(str(spec)):
    match = _ENTRY.match(text)
    if not match or match.group(1) not in by_name:
      raise ConfigError("model.mixers", spec, f"unknown mixer {text!r}; valid: "
                        + ", ".join(sorted(by_name)))
    mixer = by_name[match.group(1)]
    section = model[mixer.section] if model is not None else mixer.defaults()
    overrides = []
    for item in _split_top_level(match.group(2) or ""):
      field, eq, value = item.partition("=")
      field = field.strip()
      if not eq:
        raise ConfigError("model.mixers", spec, f"{text!r}: an override is field=value, got "
                          f"{item.strip()!r}")
      if field not in section:
        raise ConfigError("model.mixers", spec, f"{mixer.name} has no field {field!r}",
                          sorted(section.keys()))
      overrides.append((field, _parse_value(value, section[field], text)))
    entries.append(MixerEntry(mixer, tuple(overrides), text))
  if not entries:
    raise ConfigError("model.mixers", spec, "is empty; valid mixers: "
                      + ", ".join(sorted(by_name)))
  return entries
