"""The config a run was trained with: `--config=configs/saved_run.py:WORKDIR`.

`experiments.evaluate` and `experiments.sample` use this by default, so that
`python -m experiments.evaluate --workdir=RUN --config.eval.lengths=1x,32x` overrides fields of
the run's own config.
"""

from longjax import runs


def get_config(workdir: str | None = None):
  if not workdir:
    raise ValueError("configs/saved_run.py needs the run directory: configs/saved_run.py:WORKDIR")
  return runs.saved_config(workdir)
