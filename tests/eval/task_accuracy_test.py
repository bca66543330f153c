"""Task accuracy: exact match against an oracle, greedy predictions against per-prefix decoding,
and the harness's accuracy sweep and retrieval grids on trained runs."""

import json
import os
from unittest import mock

from absl.testing import absltest
from flax import nnx
import jax
import numpy as np

from longjax import experiment
from longjax.data import tasks
from longjax.errors import ConfigError
from longjax.eval import harness, task_accuracy
from longjax.models import build_model
from longjax.training import step as step_lib
from tests import testing


def _copy_examples(sizes, count=3):
  spec = tasks.get('copy')
  return [spec.generate(spec.defaults(), tasks.example_rng(0, 2, s, 0, i), s)
          for s in sizes for i in range(count)]


class ScoreTest(absltest.TestCase):

  def _score(self, predict, examples, batch_size=4):
    with mock.patch.object(task_accuracy, '_predictions', predict):
      return task_accuracy.score(None, None, examples, batch_size=batch_size)

  def test_an_oracle_is_always_right(self):
    exact, token_accuracy = self._score(lambda g, p, t: t[:, 1:], _copy_examples([1, 5, 9]))
    self.assertTrue(exact.all())
    self.assertEqual(token_accuracy, 1.0)

  def test_one_wrong_scored_token_fails_only_its_example(self):
    examples = _copy_examples([4], count=5)
    wrong = {1, 3}
    position = int(np.flatnonzero(examples[0].scored)[2]) - 1  # predicts the third answer token

    def predict(graphdef, params, tokens):
      out = np.array(tokens[:, 1:])
      # Rows are this batch's; the batch of 4 holds examples 0-3, the second 4 and 3 copies.
      for row in range(len(out)):
        if self._offset + row in wrong:
          out[row, position] += 1
      out[:, 0] += 1  # an unscored position (predicting the first prompt symbol): ignored
      self._offset += len(out)
      return out

    self._offset = 0
    exact, token_accuracy = self._score(predict, examples)
    np.testing.assert_array_equal(exact, [i not in wrong for i in range(5)])
    scored = sum(int(e.scored.sum()) for e in examples)
    self.assertAlmostEqual(token_accuracy, 1 - 2 / scored)


class TokenPredictionsTest(absltest.TestCase):

  def test_equal_the_argmax_of_each_prefix(self):
    config = testing.tiny_config()
    model = build_model(config.model, vocab_size=259, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = np.random.RandomState(0).randint(3, 259, (2, 12)).astype(np.int32)
    predictions = np.asarray(jax.jit(step_lib.token_predictions, static_argnums=0)(
        graphdef, params, tokens))
    for t in (0, 4, 10):
      logits, _ = model(tokens[:, :t + 1])
      np.testing.assert_array_equal(predictions[:, t], np.argmax(logits[:, -1], -1))


class HarnessTest(absltest.TestCase):

  def test_task_run_trains_and_evaluates_its_accuracy_then_a_grid(self):
    workdir = os.path.join(self.create_tempdir().full_path, 'run')
    config = testing.tiny_config(**{
        'task.name': 'copy', 'task.train_sizes': '1-4', 'task.test_sizes': '2,6',
        'task.num_train': 64, 'task.num_validation': 8, 'data.seq_len': 16, 'train.steps': 4,
        'eval.num_sequences': 3})
    self.assertEqual(harness.run_tasks(config), ('accuracy',))
    result = experiment.train_and_evaluate(config, workdir, progress=False)
    with open(os.path.join(workdir, 'eval', 'accuracy.json'), encoding='utf-8') as f:
      saved = json.load(f)
    self.assertEqual(saved['sizes'], [2, 6])
    self.assertEqual(saved['train_sizes'], [1, 2, 3, 4])
    self.assertEqual(result.eval['accuracy']['accuracy'], saved['accuracy'])
    self.assertTrue(os.path.exists(os.path.join(workdir, 'plots', 'copy_accuracy.png')))
    # The passkey grid on the same model (byte tokens): lengths x depths.
    config.eval.lengths, config.task.depths = '176,192', '0,1'
    ctx = harness.EvalContext(config=config, graphdef=result.graphdef, params=result.params,
                              corpus=result.corpus, workdir=workdir, progress=False)
    grid = harness.evaluate(ctx, ('passkey',))['passkey']
    self.assertEqual(np.asarray(grid['accuracy']).shape, (2, 2))
    self.assertTrue(os.path.exists(os.path.join(workdir, 'plots', 'passkey_grid.png')))

  def test_run_tasks_and_their_errors(self):
    config = testing.tiny_config()
    self.assertEqual(harness.run_tasks(config), ('perplexity',))
    config.task.name = 'passkey'
    self.assertEqual(harness.run_tasks(config), ('passkey',))
    config.eval.tasks = 'perplexity,needle'
    self.assertEqual(harness.run_tasks(config), ('perplexity', 'needle'))
    config.eval.tasks = 'perplexity,nope'
    with self.assertRaisesRegex(ConfigError, "eval.tasks='nope'.*accuracy.*passkey"):
      harness.run_tasks(config)
    config.eval.tasks = 'accuracy'
    ctx = harness.EvalContext(config=config, graphdef=None, params=None, corpus=None,
                              workdir='', progress=False)
    with self.assertRaisesRegex(ConfigError, "eval.tasks='accuracy'.*passkey"):
      harness.accuracy_task(ctx)


if __name__ == '__main__':
  absltest.main()
