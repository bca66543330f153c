"""Train a model and evaluate it.

  python -m experiments.train --config=configs/quickstart.py --workdir=runs/quickstart \
      [--config.train.steps=500 --config.model.posenc.kind=alibi ...]

Writes into --workdir: config.json, checkpoints/, metrics.jsonl, tensorboard/, eval/*.json and
plots/*.png. Rerunning the same command resumes from the latest checkpoint.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  from longjax import experiment  # pylint: disable=g-import-not-at-top
  with common.training_errors():
    result = experiment.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  if result.interrupted:
    print(f"interrupted at step {result.step}; checkpoint saved. Rerun the same command to resume.")
    raise SystemExit(130)
  if result.already_complete:
    print(f"already complete at step {result.step} (train.steps="
          f"{_CONFIG.value.train.steps}); nothing to do. Raise --config.train.steps to train "
          "further; python -m experiments.evaluate re-evaluates")
    return
  from longjax import runs  # pylint: disable=g-import-not-at-top
  # No train loss when the run was complete but for its evaluation (interrupted there).
  trained = "" if result.final_loss is None else f", train loss {result.final_loss:.4f}"
  print(f"done: step {result.step}{trained}, validation loss {result.val_loss:.4f}")
  for task_result in result.eval.values():
    print(runs.describe(task_result))


if __name__ == "__main__":
  common.run(main)
