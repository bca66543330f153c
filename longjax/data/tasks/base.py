"""What a synthetic task is: a generator of scored token sequences and a brute-force checker.

An `Example` is one sequence `tokens` (int32 [n], BOS first, EOS last) whose `scored` positions
are the answer: the model is trained and evaluated on those targets only. Every task renders
into the byte tokenizer's ids (`longjax.data.tokenizers.ByteTokenizer`), so that any run can be
fed any task; the text tasks (passkey, needle) take the run's tokenizer instead, so that their
grids also evaluate models trained on text.

A task's `size` is the length variable a study sweeps: symbols or digits for the algorithmic
tasks, tokens for passkey and the Mamba synthetics, key-value pairs for MQAR. Generation is
deterministic: example `i` of a stream is drawn from `example_rng(seed, stream, i)`, whatever
was drawn before it.

`check(example)` never calls the generator's code: it parses the prompt back out of the tokens,
computes the answer the slow obvious way, and compares it with the scored tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import ml_collections
import numpy as np

from longjax.data import tokenizers
from longjax.errors import ConfigError

BYTES = tokenizers.ByteTokenizer()


class SizeError(ValueError):
  """A task cannot make an example of this size; the caller names the config field."""


def sized(field: str, generate: Callable[[int], Example], size: int) -> Example:
  """`generate(size)`, with a `SizeError` turned into a one-line ConfigError on `field`."""
  try:
    return generate(size)
  except SizeError as e:
    raise ConfigError(field, size, str(e)) from None


@dataclasses.dataclass(frozen=True)
class Example:
  tokens: np.ndarray  # int32 [n]: BOS, prompt, answer, EOS
  scored: np.ndarray  # bool [n]: the answer tokens (and the EOS that ends it)
  size: int           # the task's length variable for this example
  depth: float = -1.0  # where the needle sits, as a fraction of the haystack (retrieval tasks)

  def answer(self) -> np.ndarray:
    return self.tokens[self.scored]


def assemble(prompt: Sequence[int] | np.ndarray, answer: Sequence[int] | np.ndarray, size: int,
             depth: float = -1.0, tokenizer=BYTES) -> Example:
  """[BOS] + prompt + answer + [EOS], with the answer and the EOS scored."""
  prompt = np.asarray(prompt, np.int32)
  answer = np.asarray(answer, np.int32)
  tokens = np.concatenate([[tokenizer.bos_id], prompt, answer, [tokenizer.eos_id]])
  scored = np.zeros(tokens.shape, bool)
  scored[1 + len(prompt):] = True
  return Example(tokens=tokens.astype(np.int32), scored=scored, size=int(size), depth=depth)


def text_example(prompt: str, answer: str, size: int, depth: float = -1.0) -> Example:
  return assemble(BYTES.encode(prompt), BYTES.encode(answer), size, depth)


def split_text(example_tokens: np.ndarray, scored: np.ndarray, tokenizer=BYTES
               ) -> tuple[str, str]:
  """(prompt text, answer text) of an example; the EOS is dropped from the answer."""
  tokens = np.asarray(example_tokens)
  scored = np.asarray(scored, bool)
  return tokenizer.decode(tokens[~scored]), tokenizer.decode(tokens[scored])


def example_rng(seed: int, stream: int, *index: int) -> np.random.Generator:
  """The generator of example `index` of stream `stream` (0 train, 1 validation, 2 evaluation,
  where the index also names the grid cell: size, depth, example)."""
  return np.random.default_rng([seed, stream, *index])


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task: its config section's defaults, its generator and its checker.

  `generate(cfg, rng, size, tokenizer=..., depth=...)` returns an `Example`; `check(cfg,
  example, tokenizer=...)` whether the example's answer is right. `cfg` is the task's own
  section of the config (`config.task.<name>`).
  """

  name: str
  size_unit: str                       # what `size` counts, for plots and errors
  description: str
  defaults: Callable[[], ml_collections.ConfigDict]
  generate: Callable[..., Example]
  check: Callable[..., bool]
  validate: Callable[[Any], None] = lambda cfg: None
  text: bool = False                   # renders text through the run's tokenizer
  has_depth: bool = False              # the retrieval tasks place their needle at a depth


def parse_sizes(field: str, spec: str) -> list[int]:
  """'1-20' -> [1, ..., 20]; '64,128,256' -> those; mixes ('1-4,8') allowed; sorted, unique."""
  sizes = set()
  for item in filter(None, (s.strip() for s in str(spec).split(','))):
    try:
      if '-' in item:
        lo, hi = (int(v) for v in item.split('-'))
        if lo > hi:
          raise ValueError
        sizes.update(range(lo, hi + 1))
      else:
        sizes.add(int(item))
    except ValueError:
      raise ConfigError(field, spec, f'cannot parse {item!r}',
                        ['N', 'A-B (A <= B)', 'a comma-separated mix']) from None
  if not sizes:
    raise ConfigError(field, spec, 'no sizes given')
  if min(sizes) < 1:
    raise ConfigError(field, spec, 'sizes must be positive')
  return sorted(sizes)


LETTERS = 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'


def symbols(count: int) -> str:
  """The first `count` lowercase letters, then uppercase (the tasks' symbol alphabet)."""
  if not 2 <= count <= len(LETTERS):
    raise ValueError(f'need 2 <= alphabet size <= {len(LETTERS)}, got {count}')
  return LETTERS[:count]


def letter_count_validator(task: str, field: str) -> Callable[[Any], None]:
  """A task's `validate(cfg)` for `cfg.<field>`, the number of letters its symbols come from."""
  def validate(cfg):
    if not 2 <= cfg[field] <= len(LETTERS):
      raise ConfigError(f'task.{task}.{field}', cfg[field], f'must be in [2, {len(LETTERS)}]')
  return validate
