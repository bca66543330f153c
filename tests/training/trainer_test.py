"""The training loop: learning, exact resume after SIGKILL, corrupt checkpoints, NaN, Ctrl-C."""

import os
import signal
import subprocess
import time

from absl.testing import absltest
import numpy as np

from longjax import experiment
from longjax.training import checkpoints, trainer
from longjax.training.metrics import read_metrics
from tests import testing


def _losses(workdir):
  return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


def _train(workdir, *extra, env=None):
  """Runs the train entry point to its end (forked from a warm server: testing.run_module)."""
  return testing.run_module("experiments.train", "--config=configs/quickstart.py:tiny",
                            f"--workdir={workdir}", *testing.cli_overrides(testing.tiny_config()),
                            *extra, env=env)


def _default_sigint():
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def _train_cli(workdir, *extra, env=None):
  """The train entry point as a cold process of its own, for tests that signal it.

  SIGINT is reset to its default in the child: a test run started in the background of a
  non-interactive shell (`pytest ... &`, as CI scripts may) has SIGINT ignored, a child
  inherits that, and Python then never installs its Ctrl-C handler; the SIGINT tests would
  see a run that ignores Ctrl-C and finishes with exit 0 (they did, until 2026-12-07).
  """
  cmd = [testing.PYTHON, "-m", "experiments.train", "--config=configs/quickstart.py:tiny",
         f"--workdir={workdir}", *testing.cli_overrides(testing.tiny_config()), *extra]
  return subprocess.Popen(cmd, cwd=testing.REPO_ROOT, env=env or testing.python_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=_default_sigint)


class TrainerTest(absltest.TestCase):

  def test_loss_decreases_and_outputs_exist(self):
    workdir = self.create_tempdir().full_path
    config = testing.tiny_config(**{"train.steps": 40, "train.log_every": 5})
    result = experiment.train_and_evaluate(config, workdir, progress=False)
    losses = [m["loss"] for m in read_metrics(workdir) if "loss" in m]
    self.assertLess(np.mean(losses[-2:]), losses[0] - 0.5)  # starts near ln(259) = 5.56
    self.assertLess(result.val_loss, 5.0)
    for path in ("config.json", "metrics.jsonl", "eval/perplexity.json",
                 "plots/loss_vs_length.png", "plots/loss_vs_position.png",
                 "plots/training_curve.png"):
      self.assertTrue(os.path.exists(os.path.join(workdir, path)), path)
    record = read_metrics(workdir)[0]
    for key in ("step", "loss", "tokens_per_sec", "lr"):
      self.assertIn(key, record)
    self.assertTrue(os.listdir(os.path.join(workdir, "tensorboard")))

  def test_sentencepiece_and_bfloat16_train(self):
    workdir = self.create_tempdir().full_path
    config = testing.tiny_config(**{"train.steps": 30, "train.log_every": 5,
                                    "data.tokenizer": "sentencepiece", "data.vocab_size": 400,
                                    "model.dtype": "bfloat16"})
    result = experiment.train_and_evaluate(config, workdir, progress=False)
    self.assertTrue(os.path.exists(os.path.join(workdir, "tokenizer.model")))
    losses = [m["loss"] for m in read_metrics(workdir) if "loss" in m]
    self.assertLess(losses[-1], losses[0] - 0.5)
    sweep = result.eval["perplexity"]
    # Sentencepiece tokens stand for several bytes each: bits/byte < nats/token / ln 2.
    self.assertLess(sweep["bits_per_byte"][0], sweep["loss"][0] / np.log(2))

  def test_exact_resume_after_sigkill_in_a_save_and_corrupt_checkpoint_fallback(self):
    # Reference: 20 steps in one go (in this process).
    flags = ("--config.train.log_every=1", "--config.train.checkpoint_every=5")
    straight = self.create_tempdir().full_path
    config = testing.tiny_config(**{"train.steps": 20, "train.log_every": 1,
                                    "train.checkpoint_every": 5})
    experiment.train_and_evaluate(config, straight, progress=False)

    # 20 steps with a SIGKILL inside the asynchronous save of step 15 (its files written, not
    # committed) while training goes on, then a restart: it resumes from step 10.
    resumed = self.create_tempdir().full_path
    env = testing.python_env()
    env[checkpoints._SIGKILL_IN_SAVE_ENV] = "15"  # pylint: disable=protected-access
    proc = _train(resumed, *flags, env=env)
    self.assertEqual(proc.returncode, -signal.SIGKILL)
    self.assertGreaterEqual(max(_losses(resumed)), 15)
    self.assertEqual(sorted(os.listdir(os.path.join(resumed, "checkpoints"))),
                     ["10", "15.orbax-checkpoint-tmp", "5"])  # killed mid-save
    proc = _train(resumed, *flags)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn("resuming from the checkpoint of step 10", proc.stderr)

    a, b = _losses(straight), _losses(resumed)
    self.assertEqual(sorted(b), list(range(1, 21)))  # steps 11..15+ were not logged twice
    self.assertEqual(a, b)  # bitwise: JSON floats round-trip exactly
    flat_a = testing.checkpoint_arrays(straight, 20)
    flat_b = testing.checkpoint_arrays(resumed, 20)
    self.assertEqual(flat_a.keys(), flat_b.keys())
    for key in flat_a:
      np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg=key)
    # The same position in the same data order.
    self.assertEqual(testing.data_position(straight, 20), testing.data_position(resumed, 20))
    for step in (15, 20):  # the re-saved step 15 replaced the killed save's folder
      self.assertTrue(checkpoints.verify_checksums(
          os.path.join(resumed, "checkpoints", str(step))))

    # Corrupt the latest checkpoint (step 20): the previous one (15) is restored instead, and a
    # rerun from it reproduces step 20 exactly.
    state_dir = os.path.join(resumed, "checkpoints", "20", "state")
    for root, _, files in os.walk(state_dir):
      for name in files:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(max(os.path.getsize(os.path.join(root, name)) // 3, 1))
    proc = _train(resumed, *flags)
    self.assertEqual(proc.returncode, 0, proc.stderr[-2000:])
    self.assertIn("checkpoint step 20 could not be restored", proc.stderr)
    self.assertTrue(os.path.isdir(os.path.join(resumed, "checkpoints_corrupt", "20")))
    self.assertEqual(_losses(resumed), a)
    flat_c = testing.checkpoint_arrays(resumed, 20)
    for key in flat_a:
      np.testing.assert_array_equal(flat_a[key], flat_c[key], err_msg=key)

  def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(self):
    # Warmup makes step 1's learning rate 0 and step 2's 5e37: its update overflows.
    workdir = self.create_tempdir().full_path
    config = testing.tiny_config(**{"train.learning_rate": 1e38, "train.warmup_steps": 2,
                                    "train.checkpoint_every": 1})
    # The message names the metric that is not finite (here the parameter norm after the
    # update; the loss, computed before it, is still finite).
    with self.assertRaisesRegex(trainer.NonFiniteLossError, r"^the parameter norm is inf at step "
                                r"2; stopped without saving \(loss [0-9.]+, .*last good "
                                r"checkpoint is step 1"):
      experiment.train_and_evaluate(config, workdir, progress=False)
    self.assertEqual(sorted(os.listdir(os.path.join(workdir, "checkpoints"))), ["1"])

  def test_sigint_saves_a_checkpoint_and_exits(self):
    workdir = self.create_tempdir().full_path
    proc = _train_cli(workdir, "--config.train.steps=100000", "--config.train.log_every=1",
                      "--config.train.checkpoint_every=100000")
    deadline = time.time() + 300
    while not _losses(workdir) and time.time() < deadline and proc.poll() is None:
      time.sleep(0.5)
    self.assertIsNone(proc.poll(), "training ended before it could be interrupted")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 130, err[-2000:])
    self.assertIn("checkpoint saved", out)
    saved = [int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()]
    self.assertEqual(saved, [max(_losses(workdir))])

  def test_sigint_during_start_up_exits_130_in_one_line(self):
    # The run folder appears once the dataset is loaded, before the state is created and the
    # step compiled: Ctrl-C then used to end in a KeyboardInterrupt traceback and a segfault.
    workdir = os.path.join(self.create_tempdir().full_path, "run")
    proc = _train_cli(workdir)
    deadline = time.time() + 300
    while not os.path.isdir(workdir) and time.time() < deadline and proc.poll() is None:
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    self.assertEqual(proc.returncode, 130, err[-2000:])
    self.assertNotIn("Traceback", err)
    self.assertLen([line for line in err.splitlines() if line.strip()], 1, err[-2000:])


if __name__ == "__main__":
  absltest.main()
