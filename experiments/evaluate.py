"""Re-evaluate a trained run, optionally with config overrides applied at evaluation time.

  python -m experiments.evaluate --workdir=runs/quickstart \
      [--config.eval.lengths=1x,2x,4x,8x,16x,32x] [--label=NAME] [--step=N]

  python -m experiments.evaluate --workdir=runs/quickstart --compare=none,pi,ntk,yarn

Without --config the run's saved config is used; --config.a.b=v overrides its fields (e.g. a
training-free positional-encoding change). Results go to WORKDIR/eval/perplexity[-LABEL].json and
WORKDIR/plots/. --compare evaluates the named evaluation-time methods
(longjax.eval.compare.EVAL_METHODS) on the same documents and overlays their curves in
plots/compare_loss_vs_length.png.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config (default: the run's saved config, configs/saved_run.py:WORKDIR).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory written by experiments.train.")
_LABEL = flags.DEFINE_string("label", "", "Names this evaluation in file names and plots.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_COMPARE = flags.DEFINE_list("compare", [],
                             "Evaluation-time methods to overlay, e.g. none,pi,yarn.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.start()
  from longjax import configuration, runs  # pylint: disable=g-import-not-at-top (fast --help)
  from longjax.eval import harness  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  if _COMPARE.value:
    from longjax.eval import compare  # pylint: disable=g-import-not-at-top
    unknown = [m for m in _COMPARE.value if m not in compare.EVAL_METHODS]
    if unknown:  # before the (slow) restore
      common.fail(f"--compare: unknown method(s) {', '.join(unknown)}; valid: "
                  + ", ".join(sorted(compare.EVAL_METHODS)))
  try:
    configuration.validate_eval_lengths(config)
  except configuration.ConfigError as e:
    common.fail(f"config: {e}")
  run = common.load_run_or_fail(_WORKDIR.value, config, step=_STEP.value)
  print(f"step {run.step}")
  if _COMPARE.value:
    try:
      results = compare.compare(config=config, params=run.params, corpus=run.corpus,
                                workdir=_WORKDIR.value, methods=_COMPARE.value)
    except configuration.ConfigError as e:
      common.fail(f"config: {e}")
    print(compare.describe(results))
    return
  # run.config: `config`, plus what loading decided (DuoAttention's calibrated head split).
  ctx = harness.EvalContext(config=run.config, graphdef=run.graphdef, params=run.params,
                            corpus=run.corpus, workdir=_WORKDIR.value, label=_LABEL.value)
  results = harness.evaluate(ctx)
  for result in results.values():
    print(runs.describe(result))


if __name__ == "__main__":
  sys.argv = common.default_to_saved_config(sys.argv)
  common.run(main)
