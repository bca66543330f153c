"""`train_and_evaluate(config, workdir)`: what `experiments.train` runs, for notebooks and tests.

Training (`longjax.training.trainer`) and evaluation (`longjax.eval`) meet only here, so the
arrows between them go one way: evaluation uses training's step functions, and training knows
nothing of evaluation.
"""

from longjax.eval import harness
from longjax.training import trainer


def train_and_evaluate(config, workdir: str, *, progress: bool = True) -> trainer.TrainResult:
  """Trains `config` in `workdir` (resuming if it holds checkpoints), then evaluates it.

  A run already at `train.steps` is only evaluated if its results are missing (an evaluation
  that was interrupted); one with results, or past `train.steps`, returns `already_complete`.

  Raises:
    ConfigError, ResumeError, CheckpointError, SourceError: before anything is written (see
      `trainer.train`).
    NonFiniteLossError: when the loss stops being finite.
  """
  tasks = harness.run_tasks(config)
  result = trainer.train(config, workdir, progress=progress,
                         is_complete=lambda w: harness.has_results(w, tasks))
  if result.interrupted or result.already_complete:
    return result
  ctx = harness.EvalContext(config=result.config, graphdef=result.graphdef,
                            params=result.params, corpus=result.corpus, workdir=workdir,
                            progress=progress)
  result.eval = harness.evaluate(ctx, tasks)
  return result
