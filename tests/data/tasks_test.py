"""Tests for longjax.data.tasks: every generator's examples pass its brute-force checker, a
corrupted answer fails it, generation is deterministic, and bad fields give one-line errors."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from longjax.data import tasks
from longjax.data import tokenizers
from longjax.data.tasks import base
from longjax.errors import ConfigError

# Sizes per task: small, typical, and (for the algorithmic tasks) the edge case 1.
_SIZES = {'copy': (1, 7, 25), 'reverse': (1, 7, 25), 'sort': (1, 7, 25),
          'addition': (1, 3, 12), 'parity': (1, 7, 25), 'mqar': (1, 8, 32),
          'induction_heads': (4, 30, 200), 'selective_copying': (16, 40, 200),
          'passkey': (200, 400), 'needle': (300, 700)}
_CASES = [dict(testcase_name=f'{name}{"_scratchpad" if pad else ""}', name=name, scratchpad=pad)
          for name in sorted(tasks.TASKS)
          for pad in ((False, True) if 'scratchpad' in tasks.get(name).defaults() else (False,))]


def _examples(name, scratchpad=False, cfg=None, count=12):
  spec = tasks.get(name)
  cfg = cfg or spec.defaults()
  if 'scratchpad' in cfg:
    cfg.scratchpad = scratchpad
  out = []
  for size in _SIZES[name]:
    for i in range(count):
      kwargs = {'depth': i / (count - 1)} if spec.has_depth else {}
      out.append(spec.generate(cfg, tasks.example_rng(0, 0, size, i), size, **kwargs))
  return spec, cfg, out


def _corrupt(example, k):
  """The example with its k-th scored token changed to another valid byte token."""
  tokens = example.tokens.copy()
  j = np.flatnonzero(example.scored)[k]
  tokens[j] = 3 + (int(tokens[j]) - 3 + 1) % 256 if tokens[j] >= 3 else 3 + ord('x')
  return base.Example(tokens=tokens, scored=example.scored, size=example.size)


class TasksTest(parameterized.TestCase):

  @parameterized.named_parameters(_CASES)
  def test_examples_pass_their_checker(self, name, scratchpad):
    spec, cfg, examples = _examples(name, scratchpad)
    for e in examples:
      self.assertTrue(spec.check(cfg, e), base.BYTES.decode(e.tokens))
      self.assertEqual(e.tokens[0], tokenizers.BOS_ID)
      self.assertTrue(e.scored.any())
      self.assertFalse(e.scored[0])

  @parameterized.named_parameters(_CASES)
  def test_corrupted_answers_fail_their_checker(self, name, scratchpad):
    spec, cfg, examples = _examples(name, scratchpad, count=4)
    for e in examples:
      scored = np.flatnonzero(e.scored)
      for k in sorted({0, len(scored) // 2, len(scored) - 1}):
        if e.tokens[scored[k]] == tokenizers.EOS_ID:
          continue  # the EOS is scored but carries no answer
        self.assertFalse(spec.check(cfg, _corrupt(e, k)), (name, k, base.BYTES.decode(e.tokens)))

  @parameterized.named_parameters(_CASES)
  def test_generation_is_deterministic(self, name, scratchpad):
    _, _, first = _examples(name, scratchpad, count=3)
    _, _, again = _examples(name, scratchpad, count=3)
    for a, b in zip(first, again):
      np.testing.assert_array_equal(a.tokens, b.tokens)
      np.testing.assert_array_equal(a.scored, b.scored)
    self.assertFalse(np.array_equal(first[-1].tokens, first[-2].tokens))  # largest size

  def test_algorithmic_answers(self):
    def text(name, rng_index=0, **cfg_fields):
      spec = tasks.get(name)
      cfg = spec.defaults()
      cfg.update(cfg_fields)
      e = spec.generate(cfg, tasks.example_rng(1, 0, rng_index), 6)
      return base.split_text(e.tokens, e.scored)
    prompt, answer = text('reverse')
    self.assertEqual(answer, prompt[:-1][::-1])
    prompt, answer = text('sort')
    self.assertEqual(answer, ''.join(sorted(prompt[:-1])))
    prompt, answer = text('addition', scratchpad=True)
    a, b = prompt[:-1].split('+')
    self.assertEqual(answer.split(';')[-1], str(int(a) + int(b)))
    self.assertLen(answer.split(';')[0].split(','), 6)  # one step per digit

  def test_sizes_are_what_they_say(self):
    for name in ('passkey', 'needle'):
      spec, _, examples = _examples(name, count=3)
      for e in examples:
        self.assertLen(e.tokens, e.size)  # tokens, BOS and EOS included
    _, cfg, examples = _examples('mqar', count=3)
    for e in examples:
      self.assertLen(e.tokens, cfg.length + 1)
      self.assertEqual(e.scored.sum(), e.size)  # every key asked once
    _, _, examples = _examples('copy', count=1)
    for e in examples:
      self.assertEqual(e.scored.sum(), e.size + 1)  # the copy and its EOS

  def test_passkey_sits_at_its_depth(self):
    spec = tasks.get('passkey')
    for depth in (0.0, 0.5, 1.0):
      e = spec.generate(spec.defaults(), tasks.example_rng(0, 0, 0), 2000, depth=depth)
      text = base.BYTES.decode(e.tokens)
      where = text.index('The pass key is') / len(text)
      self.assertAlmostEqual(where, depth, delta=0.12)

  def test_needle_threading_follows_the_chain(self):
    spec = tasks.get('needle')
    cfg = spec.defaults()
    cfg.needles, cfg.hops = 5, 3
    e = spec.generate(cfg, tasks.example_rng(0, 0, 0), 1500, depth=0.3)
    self.assertTrue(spec.check(cfg, e))
    prompt, answer = base.split_text(e.tokens, e.scored)
    self.assertIn('follow the values 3 times', prompt)
    self.assertEqual(prompt.count('The value of '), 5)
    self.assertRegex(answer, r'^ [A-Z]{5}$')

  def test_text_tasks_take_the_runs_tokenizer(self):
    texts = [base.BYTES.decode(e.tokens) for e in _examples('needle', count=2)[2]] * 4
    model_path = self.create_tempdir().full_path + '/sp.model'
    tokenizer = tokenizers.build_tokenizer('sentencepiece', model_path=model_path,
                                           texts=lambda: iter(texts), vocab_size=512)
    for name in ('passkey', 'needle'):
      spec = tasks.get(name)
      e = spec.generate(spec.defaults(), tasks.example_rng(0, 0, 0), 400, tokenizer=tokenizer,
                        depth=0.4)
      self.assertLen(e.tokens, 400)
      self.assertTrue(spec.check(spec.defaults(), e, tokenizer=tokenizer), name)

  def test_bad_fields_give_one_line_errors(self):
    with self.assertRaisesRegex(ConfigError, r"task\.train_sizes.*'5-2'"):
      tasks.parse_sizes('task.train_sizes', '5-2')
    with self.assertRaisesRegex(ConfigError, 'task.name.*nope.*copy'):
      tasks.get('nope')
    with self.assertRaisesRegex(ConfigError, 'task.depths'):
      tasks.parse_depths('0.5,2')
    spec = tasks.get('mqar')
    cfg = spec.defaults()
    cfg.length = 20
    with self.assertRaisesRegex(tasks.SizeError, r'task\.mqar\.length=20 .*need >= 32'):
      spec.generate(cfg, tasks.example_rng(0, 0, 0), 8)
    passkey = tasks.get('passkey')
    with self.assertRaisesRegex(ConfigError, r'eval\.lengths=50: too short: the fixed text'):
      tasks.sized('eval.lengths', lambda n: passkey.generate(
          passkey.defaults(), tasks.example_rng(0, 0, 0), n, depth=0.5), 50)
    self.assertEqual(tasks.parse_sizes('f', '1-3,8'), [1, 2, 3, 8])


if __name__ == '__main__':
  absltest.main()
