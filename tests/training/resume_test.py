"""Resuming a run: a changed config is refused before anything is written; allowed changes
(longer training, evaluation settings) resume; a finished run is left alone."""

import json
import os
import re
import shutil
from unittest import mock

from absl.testing import absltest
import numpy as np
import pytest

from longjax import experiment
from longjax.training import checkpoints, resume
from longjax.training.metrics import read_metrics
from tests import testing

_BASE = testing.TRAINED_RUN_OVERRIDES


def _losses(workdir):
  return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


# One worker trains the shared run (--dist=loadgroup in setup.cfg).
@pytest.mark.xdist_group(testing.TRAINED_RUN_GROUP)
class ResumeTest(absltest.TestCase):
  """Each test resumes a copy of `testing.trained_run()` (checkpoints at steps 3 and 6)."""

  def setUp(self):
    super().setUp()
    self._run = testing.trained_run()

  def _copy(self):
    return testing.copy_of_trained_run(self.create_tempdir().full_path)

  def test_changed_config_is_refused_twice_and_the_run_survives(self):
    workdir = self._copy()
    before = testing.tree_bytes(workdir)
    for field, value in (("model.width", 128), ("model.posenc.kind", "alibi"),
                         ("data.seq_len", 64), ("train.learning_rate", 1e-3), ("seed", 1)):
      for _ in range(2):  # the second attempt used to delete what the first had moved
        with self.assertRaisesRegex(resume.ResumeError,
                                    rf"holds checkpoints of a run with another config "
                                    rf"\(.*{field}=.* in the run, .* now.*\); resuming may change "
                                    r"only train\.steps"):
          experiment.train_and_evaluate(testing.tiny_config(**_BASE, **{field: value}), workdir,
                                     progress=False)
        self.assertEqual(testing.tree_bytes(workdir), before, field)
    # The run's own config still resumes it: it is complete, so nothing changes.
    result = experiment.train_and_evaluate(testing.tiny_config(**_BASE), workdir, progress=False)
    self.assertTrue(result.already_complete)
    self.assertEqual(result.step, 6)
    self.assertEqual(testing.tree_bytes(workdir), before)

  def test_fewer_steps_than_the_checkpoint_is_complete(self):
    workdir = self._copy()
    before = testing.tree_bytes(workdir)
    result = experiment.train_and_evaluate(testing.tiny_config(**{**_BASE, "train.steps": 3}),
                                        workdir, progress=False)
    self.assertTrue(result.already_complete)
    self.assertEqual(result.step, 6)
    # config.json now records train.steps=3 (a resumable field); nothing else changed.
    del before["config.json"]
    after = testing.tree_bytes(workdir)
    del after["config.json"]
    self.assertEqual(after, before)

  def test_complete_run_without_its_evaluation_is_evaluated(self):
    # E.g. Ctrl-C during the final evaluation: the rerun trains nothing and evaluates.
    workdir = self._copy()
    os.remove(os.path.join(workdir, "eval", "perplexity.json"))
    result = experiment.train_and_evaluate(testing.tiny_config(**_BASE), workdir, progress=False)
    self.assertEqual((result.step, result.already_complete, result.final_loss), (6, False, None))
    self.assertIsNotNone(result.val_loss)
    with open(os.path.join(self._run, "eval", "perplexity.json")) as f:
      self.assertEqual(result.eval["perplexity"]["loss"], json.load(f)["loss"])

  def test_resumable_fields_may_change(self):
    # Training further with other evaluation settings continues the same run: steps 1-6 are
    # kept, steps 7-8 are new, and config.json records the new values.
    workdir = self._copy()
    config = testing.tiny_config(**{**_BASE, "train.steps": 8, "train.eval_batches": 1,
                                    "train.log_every": 2, "model.attention.impl": "reference"})
    result = experiment.train_and_evaluate(config, workdir, progress=False)
    self.assertEqual((result.step, result.already_complete), (8, False))
    losses = _losses(workdir)
    self.assertEqual(sorted(losses), [1, 2, 3, 4, 5, 6, 8])
    self.assertEqual({s: losses[s] for s in range(1, 7)}, _losses(self._run))
    saved = resume._saved_config(workdir)  # pylint: disable=protected-access
    self.assertEqual((saved.train.steps, saved.train.eval_batches), (8, 1))

  def test_fresh_start_after_unrestorable_checkpoints_equals_an_empty_workdir(self):
    workdir = self._copy()
    for step in (3, 6):
      shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "state"))
    with self.assertRaises(checkpoints.NoRestorableCheckpointError):
      experiment.train_and_evaluate(testing.tiny_config(**_BASE), workdir, progress=False)
    # What the error says to do: move the checkpoints aside and rerun.
    os.rename(os.path.join(workdir, "checkpoints"), os.path.join(workdir, "unrestorable"))
    experiment.train_and_evaluate(testing.tiny_config(**_BASE), workdir, progress=False)
    self.assertEqual(_losses(workdir), _losses(self._run))  # bitwise: JSON floats round-trip
    # The final state (parameters and optimizer state) bitwise, and the data position.
    fresh, empty = testing.checkpoint_arrays(workdir, 6), testing.checkpoint_arrays(self._run, 6)
    self.assertEqual(fresh.keys(), empty.keys())
    for key in fresh:
      np.testing.assert_array_equal(fresh[key], empty[key], err_msg=key)
    self.assertEqual(testing.data_position(workdir, 6), testing.data_position(self._run, 6))

  def test_rerunning_a_finished_run_on_the_command_line_exits_0(self):
    # A finished run used to crash at the final print (formatting final_loss=None).
    workdir = self._copy()
    before = testing.tree_bytes(workdir)
    flags = testing.cli_overrides(testing.tiny_config()) + [
        f"--config.{field}={value}" for field, value in _BASE.items()]
    done = testing.run_module("experiments.train", "--config=configs/quickstart.py:tiny",
                              f"--workdir={workdir}", *flags, timeout=300)
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])
    self.assertIn("already complete at step 6 (train.steps=6); nothing to do", done.stdout)
    self.assertNotIn("Traceback", done.stderr)
    self.assertEqual(testing.tree_bytes(workdir), before)

  def test_workdir_that_is_a_file_or_under_one(self):
    path = os.path.join(self.create_tempdir().full_path, "file")
    with open(path, "w") as f:
      f.write("x")
    for workdir, message in ((path, "is a file, not a directory"),
                             (os.path.join(path, "run"), "cannot be created: .* is a file")):
      with self.assertRaisesRegex(resume.ResumeError, message):
        experiment.train_and_evaluate(testing.tiny_config(**_BASE), workdir, progress=False)

  def test_unwritable_workdir_or_parent(self):
    # Tests run as root, for whom every folder is writable: the permission answer is injected.
    parent = self.create_tempdir().full_path
    for workdir in (parent, os.path.join(parent, "new", "run")):
      with mock.patch.object(resume.os, "access", return_value=False):
        with self.assertRaisesRegex(resume.ResumeError,
                                    rf"cannot be written: no write permission on {parent}$"):
          experiment.train_and_evaluate(testing.tiny_config(**_BASE), workdir, progress=False)
    self.assertEqual(os.listdir(parent), [])


class DifferencesTest(absltest.TestCase):

  def test_leaves_compared_after_a_json_round_trip(self):
    self.assertEqual(resume.differences({"a": {"b": (1, 2), "c": 1}, "d": 0},
                                        {"a": {"b": [1, 2], "c": 2}, "e": 0}),
                     [("a.c", 1, 2), ("d", 0, None), ("e", None, 0)])

  def test_the_documented_resumable_fields_are_the_resumable_fields(self):
    with open(os.path.join(testing.REPO_ROOT, "docs", "reliability.md"), encoding="utf-8") as f:
      text = " ".join(f.read().split())
    listed = re.search(r"`RESUMABLE_FIELDS` may differ: (.*?)\. They", text)
    self.assertIsNotNone(listed, "docs/reliability.md no longer lists the resumable fields")
    fields = [f.removesuffix(".*") for f in re.findall(r"`([^`]+)`", listed.group(1))]
    self.assertEqual(fields, list(resume.RESUMABLE_FIELDS))

  def test_resumable_covers_sections_and_exact_fields(self):
    self.assertTrue(resume.resumable("eval.lengths"))
    self.assertTrue(resume.resumable("train.steps"))
    self.assertFalse(resume.resumable("train.steps_extra"))
    self.assertFalse(resume.resumable("model.width"))


if __name__ == "__main__":
  absltest.main()
