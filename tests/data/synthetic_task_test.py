"""Tests for the synthetic-task dataset: the TFDS build, training rows, batches and resume."""

import os

from absl.testing import absltest
import numpy as np

from longjax.data import corpus as corpus_lib
from longjax.data import pipeline
from longjax.data import tasks
from longjax.data.builders import synthetic_task
from longjax.defaults import default_config
from longjax.errors import ConfigError


def _config(**task_fields):
  c = default_config()
  c.task.name = 'copy'
  c.task.train_sizes = '1-6'
  c.task.num_train = 40
  c.task.num_validation = 8
  c.data.seq_len = 16
  c.task.update(task_fields)
  return c


def _records(source):
  return [source[i] for i in range(len(source))]


class SyntheticTaskTest(absltest.TestCase):

  def test_build_is_deterministic_and_matches_the_generator(self):
    c = _config()
    builders = [synthetic_task.load_synthetic_task(c.task, data_dir=self.create_tempdir().full_path)
                for _ in range(2)]
    first, second = (_records(b.as_data_source(split='train')) for b in builders)
    expected = list(synthetic_task.generate(synthetic_task.make_config(c.task), 'train'))
    self.assertLen(first, 40)
    for a, b, e in zip(first, second, expected):
      np.testing.assert_array_equal(a['tokens'], b['tokens'])
      np.testing.assert_array_equal(a['tokens'], e.tokens)
      np.testing.assert_array_equal(a['scored'], e.scored)
      self.assertTrue(tasks.get('copy').check(c.task.copy, e))
    self.assertEqual(builders[0].info.metadata['max_tokens'],
                     max(len(r['tokens']) for r in first + _records(
                         builders[0].as_data_source(split='validation'))))
    self.assertTrue({int(r['size']) for r in first} <= set(range(1, 7)))

  def test_config_name_changes_with_what_shapes_the_examples(self):
    names = {synthetic_task.make_config(_config(**f).task).name
             for f in ({}, {'seed': 1}, {'train_sizes': '1-7'}, {'num_train': 41})}
    c = _config()
    c.task.copy.scratchpad = True
    names.add(synthetic_task.make_config(c.task).name)
    self.assertLen(names, 5)

  def test_task_row_weights_only_the_answer(self):
    spec = tasks.get('copy')
    e = spec.generate(spec.defaults(), tasks.example_rng(0, 0, 0), 3)  # BOS abc> abc EOS
    row = pipeline.task_row({'tokens': e.tokens, 'scored': e.scored}, seq_len=12)
    np.testing.assert_array_equal(row['inputs'][:8], e.tokens[:8])  # the EOS is only a target
    np.testing.assert_array_equal(row['targets'][:8], e.tokens[1:])
    np.testing.assert_array_equal(row['weights'], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(row['segment_ids'], [1] * 8 + [0] * 4)
    np.testing.assert_array_equal(row['positions'], list(range(8)) + [0] * 4)
    with self.assertRaisesRegex(ValueError, 'does not fit'):
      pipeline.task_row({'tokens': e.tokens, 'scored': e.scored}, seq_len=7)

  def test_iterator_resumes_exactly(self):
    c = _config()
    builder = synthetic_task.load_synthetic_task(c.task, data_dir=self.create_tempdir().full_path)
    source = builder.as_data_source(split='train')
    make = lambda: pipeline.make_task_iterator(data_source=source, seq_len=16, batch_size=3,
                                               seed=5)
    it = make()
    for _ in range(4):
      next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(20)]  # crosses an epoch (40 examples / 3)
    resumed = make()
    resumed.set_state(state)
    for a, b in zip(expected, [next(resumed) for _ in range(20)]):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    self.assertEqual(expected[0]['inputs'].shape, (3, 16))

  def test_eval_sequences_read_task_records(self):
    spec = tasks.get('copy')
    examples = [spec.generate(spec.defaults(), tasks.example_rng(0, 0, i), 5) for i in range(3)]
    source = [{'tokens': e.tokens, 'scored': e.scored} for e in examples]
    rows = pipeline.eval_sequences(data_source=source, tokenizer=None, length=10, count=3)
    np.testing.assert_array_equal(rows, np.stack([e.tokens[:10] for e in examples]))

  def test_corpus_refuses_a_too_short_seq_len_before_writing_the_run(self):
    c = _config(train_sizes='20')
    c.data.tfds_dir = self.create_tempdir().full_path
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    with self.assertRaisesRegex(ConfigError, r'data\.seq_len=16.*43 tokens.*>= 42'):
      corpus_lib.load_corpus(c, workdir)
    self.assertFalse(os.path.exists(workdir))
    c.data.seq_len = 42
    corpus = corpus_lib.load_corpus(c, workdir)
    self.assertEqual((corpus.task, corpus.max_tokens), ('copy', 43))


if __name__ == '__main__':
  absltest.main()
