"""Copy, reverse, sort, addition and parity, with and without a scratchpad.

The tasks of "The Impact of Positional Encoding on Length Generalization in Transformers"
(Kazemnejad et al., 2023), as text over bytes. `size` is the instance's length: symbols for
copy / reverse / sort, digits per operand for addition, bits for parity. The prompt ends with
'>'; the answer follows. With `scratchpad=True` the answer starts with the steps of the
computation, one state per step, then ';' and the result (the paper's point: a scratchpad that
writes out the carried state helps some encodings generalise):

  copy     abc>0:a,1:b,2:c;abc        (index and symbol)
  reverse  abc>2:c,1:b,0:a;cba        (index counting down)
  sort     cab>a:2,b:1,c:0;abc        (the smallest remaining symbol, how many are left after it)
  addition 57+68>7+8+0=15,5+6+1=12;125  (least significant digit first: a + b + carry = sum)
  parity   0110>0,1,0,0;0             (running parity)

The whole answer (scratchpad, result and EOS) is scored: an example is right when greedy
decoding writes all of it.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from longjax.data.tasks import base


def _defaults(alphabet: bool) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.scratchpad = False
  if alphabet:
    c.alphabet = 26  # symbols drawn uniformly from the first N letters
  return c


def _split(example: base.Example) -> tuple[str, str, str]:
  """(operand text before '>', scratchpad steps or '', result) of an example."""
  prompt, answer = base.split_text(example.tokens, example.scored)
  if not prompt.endswith('>'):
    return '', '', '\0'  # malformed: no answer matches
  steps, _, result = answer.rpartition(';')
  return prompt[:-1], steps, result


def _answer(steps: list[str], result: str, scratchpad: bool) -> str:
  return (','.join(steps) + ';' if scratchpad else '') + result


# copy / reverse / sort ----------------------------------------------------------------------

def _sequence_task(name: str, transform, describe: str) -> base.TaskSpec:
  def generate(cfg, rng, size, **unused):
    del unused
    letters = base.symbols(cfg.alphabet)
    seq = ''.join(letters[i] for i in rng.integers(0, len(letters), size))
    return base.text_example(seq + '>', _answer(_steps(name, seq), transform(seq),
                                                 cfg.scratchpad), size)

  def check(cfg, example, **unused):
    del unused
    seq, steps, result = _split(example)
    if result != _slow(name, seq):
      return False
    if not cfg.scratchpad:
      return steps == ''
    return _steps_ok(name, seq, steps)

  return base.TaskSpec(name=name, size_unit='symbols', description=describe,
                       defaults=lambda: _defaults(alphabet=True), generate=generate, check=check,
                       validate=base.letter_count_validator(name, 'alphabet'))


def _steps(name: str, seq: str) -> list[str]:
  n = len(seq)
  if name == 'copy':
    return [f'{i}:{seq[i]}' for i in range(n)]
  if name == 'reverse':
    return [f'{i}:{seq[i]}' for i in reversed(range(n))]
  ordered = sorted(seq)
  return [f'{ordered[i]}:{n - 1 - i}' for i in range(n)]


def _slow(name: str, seq: str) -> str:
  """The result computed the obvious way, for the checker."""
  if name == 'copy':
    return seq
  if name == 'reverse':
    out = ''
    for ch in seq:
      out = ch + out
    return out
  remaining, out = list(seq), ''
  while remaining:  # selection sort
    smallest = min(remaining)
    remaining.remove(smallest)
    out += smallest
  return out


def _steps_ok(name: str, seq: str, steps: str) -> bool:
  """Parses each step and checks the state it claims against the operand."""
  parts = steps.split(',') if steps else []
  if len(parts) != len(seq):
    return False
  remaining = list(seq)
  for k, part in enumerate(parts):
    left, sep, right = part.partition(':')
    if not sep:
      return False
    if name in ('copy', 'reverse'):
      index = k if name == 'copy' else len(seq) - 1 - k
      if left != str(index) or right != seq[index]:
        return False
    else:
      if left != min(remaining) or right != str(len(remaining) - 1):
        return False
      remaining.remove(left)
  return True


COPY = _sequence_task('copy', lambda s: s, 'repeat the symbols after ">"')
REVERSE = _sequence_task('reverse', lambda s: s[::-1], 'write the symbols in reverse order')
SORT = _sequence_task('sort', lambda s: ''.join(sorted(s)), 'write the symbols sorted')


# addition ------------------------------------------------------------------------------------

def _number(rng, digits: int) -> str:
  first = str(rng.integers(1 if digits > 1 else 0, 10))
  return first + ''.join(str(d) for d in rng.integers(0, 10, digits - 1))


def _generate_addition(cfg, rng, size, **unused):
  del unused
  a, b = _number(rng, size), _number(rng, size)
  steps, carry = [], 0
  for da, db in zip(reversed(a), reversed(b)):
    total = int(da) + int(db) + carry
    steps.append(f'{da}+{db}+{carry}={total}')
    carry = total // 10
  return base.text_example(f'{a}+{b}>', _answer(steps, str(int(a) + int(b)), cfg.scratchpad),
                           size)


def _check_addition(cfg, example, **unused):
  del unused
  operands, steps, result = _split(example)
  a, plus, b = operands.partition('+')
  if not (plus and a.isdigit() and b.isdigit()) or result != str(int(a) + int(b)):
    return False
  if not cfg.scratchpad:
    return steps == ''
  parts = steps.split(',')
  if len(parts) != max(len(a), len(b)):
    return False
  carry = 0
  for k, part in enumerate(parts):
    da = int(a[-1 - k]) if k < len(a) else 0
    db = int(b[-1 - k]) if k < len(b) else 0
    if part != f'{da}+{db}+{carry}={da + db + carry}':
      return False
    carry = (da + db + carry) // 10
  return True


ADDITION = base.TaskSpec(
    name='addition', size_unit='digits', description='add two numbers of `size` digits',
    defaults=lambda: _defaults(alphabet=False), generate=_generate_addition,
    check=_check_addition)


# parity --------------------------------------------------------------------------------------

def _generate_parity(cfg, rng, size, **unused):
  del unused
  bits = rng.integers(0, 2, size)
  running = np.cumsum(bits) % 2
  return base.text_example(''.join(map(str, bits)) + '>',
                           _answer([str(p) for p in running], str(running[-1]), cfg.scratchpad),
                           size)


def _check_parity(cfg, example, **unused):
  del unused
  bits, steps, result = _split(example)
  if not bits or set(bits) - {'0', '1'} or result != str(bits.count('1') % 2):
    return False
  if not cfg.scratchpad:
    return steps == ''
  return steps.split(',') == [str(bits[:k + 1].count('1') % 2) for k in range(len(bits))]


PARITY = base.TaskSpec(
    name='parity', size_unit='bits', description='the parity of a bit string',
    defaults=lambda: _defaults(alphabet=False), generate=_generate_parity, check=_check_parity)
