"""The command-line entry points, end to end in child processes."""

import json
import os

from absl.testing import absltest
from absl.testing import parameterized

from tests import testing


def _run(*args, timeout=600):
  return testing.run_module(*args, timeout=timeout)


class HelpTest(parameterized.TestCase):

  @parameterized.parameters("train", "evaluate", "sample")
  def test_help(self, name):
    proc = _run(f"experiments.{name}", "--help")
    self.assertIn(proc.returncode, (0, 1), proc.stderr)  # absl's --help exits with 1
    self.assertNotIn("Traceback", proc.stderr)
    self.assertIn("--workdir", proc.stdout)
    self.assertIn(f"python -m experiments.{name}", proc.stdout)  # the module docstring


class EndToEndTest(absltest.TestCase):

  def test_train_evaluate_sample(self):
    workdir = self.create_tempdir().full_path
    train = _run("experiments.train", "--config=configs/quickstart.py:tiny", f"--workdir={workdir}",
                 *testing.cli_overrides(testing.tiny_config()), "--config.train.steps=10")
    self.assertEqual(train.returncode, 0, train.stderr[-3000:])
    self.assertIn("validation loss", train.stdout)

    # Re-evaluate with an evaluation-time override of the saved config.
    evaluate = _run("experiments.evaluate", f"--workdir={workdir}",
                    "--config.eval.lengths=1x,2x,8x", "--label=longer")
    self.assertEqual(evaluate.returncode, 0, evaluate.stderr[-3000:])
    with open(os.path.join(workdir, "eval", "perplexity-longer.json")) as f:
      result = json.load(f)
    self.assertEqual(result["lengths"], [32, 64, 256])
    self.assertTrue(os.path.exists(os.path.join(workdir, "plots", "loss_vs_length-longer.png")))

    relative = os.path.relpath(workdir, testing.REPO_ROOT)  # as a user types it
    sample = _run("experiments.sample", f"--workdir={relative}", "--prompt=def ",
                  "--max_new_tokens=12", "--temperature=0")
    self.assertEqual(sample.returncode, 0, sample.stderr[-3000:])
    self.assertIn("--- sample 0 (step 10) ---\ndef ", sample.stdout)

  def test_evaluate_missing_run_is_one_line(self):
    missing = os.path.join(self.create_tempdir().full_path, "nothing")
    proc = _run("experiments.evaluate", f"--workdir={missing}")
    self.assertEqual(proc.returncode, 2)
    self.assertEqual(proc.stderr.strip(), f"error: --workdir={missing} is not a longjax run "
                                          "directory (it has no config.json)")


if __name__ == "__main__":
  absltest.main()
