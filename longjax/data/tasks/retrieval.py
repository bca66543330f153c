"""Retrieval from long text: passkey, needle in a haystack (one or several), needle threading.

Both render text through the run's tokenizer, so that their length x depth grids evaluate any
model (one trained on text, or on the task itself). `size` is the example's exact length in
tokens (BOS and EOS included); `depth` in [0, 1] is where the needle sits in the filler.

* **passkey** (Mohtashami & Jaggi 2023, the landmark attention paper's test): a fixed filler
  ("The grass is green. ...") repeated, "The pass key is NNNNN. Remember it. NNNNN is the pass
  key." inserted at `depth`, and the question "What is the pass key? The pass key is" at the
  end; the answer is " NNNNN".
* **needle**: the haystack is real text (the Python standard library's source, the corpus every
  machine has), with `needles` facts "The value of KEY is VALUE." (five capital letters each)
  inserted; the question asks for one of them, placed at `depth`. With `hops` > 0 the facts
  form a chain KEY0 -> KEY1 -> ... and the question asks where `hops` steps from KEY0 lead
  ("needle threading", Roberts et al. 2024); the chain's first fact sits at `depth`, the rest
  at random depths, with the remaining `needles` as distractors.
"""

from __future__ import annotations

import functools
import re
import string

import ml_collections
import numpy as np

from longjax.data.tasks import base
from longjax.errors import ConfigError

# Shorter than the landmark paper's three-sentence intro, so that CPU-scale runs (a few hundred
# byte tokens) keep most of their length for filler; the rest is the paper's wording.
_INTRO = 'Find the pass key hidden in this text and remember it.\n'
_FILLER = ('The grass is green. The sky is blue. The sun is yellow. Here we go. '
           'There and back again. ')
_PASSKEY_RE = re.compile(r'The pass key is (\d+)\. Remember it\. (\d+) is the pass key\.')
_FACT_RE = re.compile(r'The value of ([A-Z]{5}) is ([A-Z]{5})\.')
_QUESTION_RE = re.compile(r'Start at ([A-Z]{5}) and follow the values (\d+) times?\. '
                          r'You arrive at$')


def _passkey_defaults():
  c = ml_collections.ConfigDict()
  c.digits = 5
  return c


def _validate_passkey(cfg):
  if not 1 <= cfg.digits <= 18:
    raise ConfigError('task.passkey.digits', cfg.digits, 'must be in [1, 18]')


def _fill(tokenizer, text: str, count: int) -> np.ndarray:
  """The first `count` tokens of `text` repeated."""
  ids = tokenizer.encode(text)
  return np.resize(ids, count) if count else ids[:0]


def _place(tokenizer, size: int, fixed: list[np.ndarray], inserts: list[tuple[float, str]],
           question: str, answer: str, filler, depth: float) -> base.Example:
  """Fills `size` tokens: intro pieces, filler with `inserts` (fraction, text) at token
  positions, the question, the scored answer and EOS."""
  inserted = [(frac, tokenizer.encode(text)) for frac, text in inserts]
  q, a = tokenizer.encode(question), tokenizer.encode(answer)
  used = 2 + sum(map(len, fixed)) + sum(len(ids) for _, ids in inserted) + len(q) + len(a)
  budget = size - used
  if budget < 0:
    raise base.SizeError(f'too short: the fixed text takes {used} tokens')
  hay = filler(budget)
  cuts = sorted((int(round(frac * budget)), i) for i, (frac, _) in enumerate(inserted))
  pieces, start = list(fixed), 0
  for cut, i in cuts:
    pieces += [hay[start:cut], inserted[i][1]]
    start = cut
  pieces += [hay[start:], q]
  return base.assemble(np.concatenate(pieces), a, size, depth, tokenizer=tokenizer)


def _generate_passkey(cfg, rng, size, *, tokenizer=base.BYTES, depth=0.5):
  key = ''.join(str(d) for d in rng.integers(0, 10, cfg.digits))
  sentence = f'The pass key is {key}. Remember it. {key} is the pass key. '
  return _place(tokenizer, size, [tokenizer.encode(_INTRO)], [(depth, sentence)],
                'What is the pass key? The pass key is', f' {key}',
                functools.partial(_fill, tokenizer, _FILLER), depth)


def _check_passkey(cfg, example, *, tokenizer=base.BYTES):
  del cfg
  prompt, answer = base.split_text(example.tokens, example.scored, tokenizer)
  found = _PASSKEY_RE.findall(prompt)
  return (len(found) == 1 and found[0][0] == found[0][1]
          and prompt.endswith('What is the pass key? The pass key is')
          and answer == f' {found[0][0]}')


PASSKEY = base.TaskSpec(
    name='passkey', size_unit='tokens', description='recall a number hidden in filler text',
    defaults=_passkey_defaults, generate=_generate_passkey, check=_check_passkey,
    validate=_validate_passkey, text=True, has_depth=True)


# needle --------------------------------------------------------------------------------------

def _needle_defaults():
  c = ml_collections.ConfigDict()
  c.needles = 1   # facts in the haystack (the chain's and the distractors)
  c.hops = 0      # 0: ask for one fact's value; k: follow a chain of k facts
  return c


def _validate_needle(cfg):
  if cfg.needles < 1:
    raise ConfigError('task.needle.needles', cfg.needles, 'must be positive')
  if not 0 <= cfg.hops <= cfg.needles:
    raise ConfigError('task.needle.hops', cfg.hops,
                      f'must be in [0, task.needle.needles = {cfg.needles}]')


@functools.lru_cache(maxsize=1)
def haystack_text(max_chars: int = 2_000_000) -> str:
  """Standard-library source (the `text_dir` validation files first), about `max_chars` long."""
  from longjax.data.builders import text_dir  # pylint: disable=g-import-not-at-top
  source = text_dir.default_source_dir()
  paths = text_dir.list_files(source, '**/*.py')
  paths.sort(key=lambda p: not text_dir.is_validation(p, 5))
  parts, total = [], 0
  for rel in paths:
    try:
      with open(f'{source}/{rel}', encoding='utf-8') as f:
        text = f.read()
    except (OSError, UnicodeDecodeError):
      continue
    parts.append(text)
    total += len(text)
    if total >= max_chars:
      break
  return ''.join(parts)


def _haystack(tokenizer, rng, count: int) -> np.ndarray:
  """`count` tokens of standard-library text from a random offset (wrapping around)."""
  text = haystack_text()
  start = int(rng.integers(0, len(text)))
  chars = 4 * count + 64  # enough for bytes; a tokenizer with longer pieces takes the loop
  piece = (text[start:] + text)[:chars]
  ids = tokenizer.encode(piece)
  while len(ids) < count:
    piece += text[:chars]
    ids = tokenizer.encode(piece)
  return ids[:count]


def _code(rng, taken: set) -> str:
  while True:
    code = ''.join(rng.choice(list(string.ascii_uppercase), 5))
    if code not in taken:
      taken.add(code)
      return code


def _generate_needle(cfg, rng, size, *, tokenizer=base.BYTES, depth=0.5):
  taken: set = set()
  chain = [_code(rng, taken) for _ in range(max(cfg.hops, 1) + 1)]
  facts = [(chain[i], chain[i + 1]) for i in range(len(chain) - 1)]
  facts += [(_code(rng, taken), _code(rng, taken)) for _ in range(cfg.needles - len(facts))]
  # The asked fact (the chain's first) at `depth`; the others anywhere.
  fracs = [depth] + list(rng.uniform(0.0, 1.0, len(facts) - 1))
  inserts = [(f, f'\nThe value of {k} is {v}.\n') for f, (k, v) in zip(fracs, facts)]
  hops = max(cfg.hops, 1)
  question = (f'\nStart at {chain[0]} and follow the values {hops} time'
              f'{"s" if hops > 1 else ""}. You arrive at')
  return _place(tokenizer, size, [], inserts, question, f' {chain[hops]}',
                lambda count: _haystack(tokenizer, rng, count), depth)


def _check_needle(cfg, example, *, tokenizer=base.BYTES):
  prompt, answer = base.split_text(example.tokens, example.scored, tokenizer)
  facts = _FACT_RE.findall(prompt)
  asked = _QUESTION_RE.search(prompt)
  if not asked or len(facts) != cfg.needles or len({k for k, _ in facts}) != len(facts):
    return False
  where, table = asked.group(1), dict(facts)
  for _ in range(int(asked.group(2))):
    if where not in table:
      return False
    where = table[where]
  return answer == f' {where}'


NEEDLE = base.TaskSpec(
    name='needle', size_unit='tokens',
    description='recall (or follow a chain of) facts hidden in standard-library source',
    defaults=_needle_defaults, generate=_generate_needle, check=_check_needle,
    validate=_validate_needle, text=True, has_depth=True)
