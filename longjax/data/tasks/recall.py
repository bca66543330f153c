"""Recall tasks: MQAR (Zoology / Based) and the Mamba paper's induction heads and selective copying.

Symbols are bytes, so that the tasks share the byte tokenizer with everything else.

* **MQAR** (multi-query associative recall, Arora et al. 2023): `size` key-value pairs
  `k1 v1 ... kP vP`, then the keys again in a random order, each at a position whose gap
  from the pairs follows Zoology's power law (p(gap = g) ∝ g^(a - 1), a = `power_a`), each
  followed by its value, which is scored. The rest of the `length` tokens is filler. Keys are
  bytes [0, num_keys), values [128, 128 + num_values), the filler byte 255.
* **induction heads**: `size` tokens of random letters from the first `vocab` letters; a '#'
  appears once in the sequence followed by a letter, and again as the last prompt token: the
  answer is that letter.
* **selective copying**: `size` tokens of noise ('.') with `num_data` letters at random
  positions; after '>' the answer is those letters in order.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from longjax.data.tasks import base
from longjax.errors import ConfigError

_VALUE_BYTE = 128
_FILLER_BYTE = 255


# MQAR ----------------------------------------------------------------------------------------

def _mqar_defaults():
  c = ml_collections.ConfigDict()
  c.length = 256       # tokens after the BOS (a training row holds data.seq_len + 1 tokens)
  c.num_keys = 64      # key vocabulary (<= 128); the pairs' keys are distinct
  c.num_values = 64    # value vocabulary (<= 127)
  c.power_a = 0.01     # Zoology's power-law exponent for the query gaps
  return c


def _validate_mqar(cfg):
  if not 1 <= cfg.num_keys <= 128:
    raise ConfigError('task.mqar.num_keys', cfg.num_keys, 'must be in [1, 128]')
  if not 1 <= cfg.num_values <= 127:
    raise ConfigError('task.mqar.num_values', cfg.num_values, 'must be in [1, 127]')
  if not 0 < cfg.power_a <= 1:
    raise ConfigError('task.mqar.power_a', cfg.power_a, 'must be in (0, 1]')


def _generate_mqar(cfg, rng, size, **unused):
  del unused
  pairs, length = size, cfg.length
  if pairs > cfg.num_keys:
    raise base.SizeError(f'{pairs} pairs need distinct keys but task.mqar.num_keys is '
                         f'{cfg.num_keys}')
  space = (length - 2 * pairs) // 2  # query slots: two tokens each, after the pairs
  if space < pairs:
    raise base.SizeError(f'task.mqar.length={length} is too short for {pairs} pairs and '
                         f'their queries (need >= {4 * pairs})')
  keys = rng.choice(cfg.num_keys, pairs, replace=False)
  values = _VALUE_BYTE + rng.integers(0, cfg.num_values, pairs)
  gaps = np.arange(1, space + 1, dtype=np.float64)
  p = gaps ** (cfg.power_a - 1)
  slots = rng.choice(space, pairs, replace=False, p=p / p.sum())
  order = rng.permutation(pairs)
  body = np.full(length, _FILLER_BYTE, np.int64)
  body[0:2 * pairs:2], body[1:2 * pairs:2] = keys, values
  scored = np.zeros(length + 1, bool)
  for slot, k in zip(slots, order):
    at = 2 * pairs + 2 * slot
    body[at], body[at + 1] = keys[k], values[k]
    scored[1 + at + 1] = True
  tokens = np.concatenate([[base.BYTES.bos_id], body + 3]).astype(np.int32)
  return base.Example(tokens=tokens, scored=scored, size=pairs)


def _check_mqar(cfg, example, **unused):
  del unused
  body = example.tokens[1:].astype(np.int64) - 3
  pairs = example.size
  table = {}
  for k, v in zip(body[0:2 * pairs:2], body[1:2 * pairs:2]):
    if not (0 <= k < cfg.num_keys and _VALUE_BYTE <= v < _VALUE_BYTE + cfg.num_values):
      return False
    table[int(k)] = int(v)
  if len(table) != pairs:
    return False
  answers = np.flatnonzero(example.scored)
  asked = sorted(int(example.tokens[j - 1]) - 3 for j in answers)
  return (asked == sorted(table) and
          all(table.get(int(example.tokens[j - 1]) - 3) == int(example.tokens[j]) - 3
              for j in answers))


MQAR = base.TaskSpec(
    name='mqar', size_unit='key-value pairs', description='recall the value of each queried key',
    defaults=_mqar_defaults, generate=_generate_mqar, check=_check_mqar, validate=_validate_mqar)


# induction heads ---------------------------------------------------------------------------

def _letters_defaults(**fields):
  c = ml_collections.ConfigDict()
  c.vocab = 16  # letters the sequence is drawn from (the Mamba paper's vocabulary size)
  for k, v in fields.items():
    c[k] = v
  return c


def _generate_induction(cfg, rng, size, **unused):
  del unused
  if size < 4:
    raise base.SizeError('induction heads needs >= 4 tokens')
  letters = base.symbols(cfg.vocab)
  seq = [letters[i] for i in rng.integers(0, cfg.vocab, size - 1)]
  at = int(rng.integers(0, size - 3))  # the trigger and its letter, before the final trigger
  seq[at] = '#'
  seq.append('#')
  return base.text_example(''.join(seq), seq[at + 1], size)


def _check_induction(cfg, example, **unused):
  del unused
  prompt, answer = base.split_text(example.tokens, example.scored)
  first = prompt.find('#')
  return (prompt.count('#') == 2 and prompt.endswith('#') and first + 1 < len(prompt) - 1
          and answer == prompt[first + 1])


INDUCTION_HEADS = base.TaskSpec(
    name='induction_heads', size_unit='tokens',
    description='after the second "#", the letter that followed the first',
    defaults=_letters_defaults, generate=_generate_induction, check=_check_induction,
    validate=base.letter_count_validator('induction_heads', 'vocab'))


# selective copying ---------------------------------------------------------------------------

def _generate_selective(cfg, rng, size, **unused):
  del unused
  if size < cfg.num_data:
    raise base.SizeError(f'selective copying needs >= task.selective_copying.num_data = '
                         f'{cfg.num_data} tokens')
  letters = base.symbols(cfg.vocab)
  data = ''.join(letters[i] for i in rng.integers(0, cfg.vocab, cfg.num_data))
  seq = ['.'] * size
  for pos, ch in zip(sorted(rng.choice(size, cfg.num_data, replace=False)), data):
    seq[pos] = ch
  return base.text_example(''.join(seq) + '>', data, size)


def _check_selective(cfg, example, **unused):
  prompt, answer = base.split_text(example.tokens, example.scored)
  data = [ch for ch in prompt[:-1] if ch != '.']
  return prompt.endswith('>') and len(data) == cfg.num_data and answer == ''.join(data)


def _validate_selective(cfg):
  base.letter_count_validator('selective_copying', 'vocab')(cfg)
  if cfg.num_data < 1:
    raise ConfigError('task.selective_copying.num_data', cfg.num_data, 'must be positive')


SELECTIVE_COPYING = base.TaskSpec(
    name='selective_copying', size_unit='tokens',
    description='copy the letters scattered among the noise, in order',
    defaults=lambda: _letters_defaults(num_data=16), generate=_generate_selective,
    check=_check_selective, validate=_validate_selective)
