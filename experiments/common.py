"""Plumbing shared by the entry points."""

import os
import sys

from absl import flags
from absl import logging

SAVED_RUN_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "configs", "saved_run.py")


def default_to_saved_config(argv: list[str]) -> list[str]:
  """Adds `--config=configs/saved_run.py:WORKDIR` unless argv names a config.

  This lets `--workdir=RUN --config.a.b=v` override fields of the run's saved config.
  """
  if any(a == "--config" or a.startswith("--config=") for a in argv):
    return argv
  workdir = None
  for i, arg in enumerate(argv):
    if arg.startswith("--workdir="):
      workdir = arg.split("=", 1)[1]
    elif arg == "--workdir" and i + 1 < len(argv):
      workdir = argv[i + 1]
  if workdir is None:
    return argv  # absl will report the missing --workdir
  if not os.path.exists(os.path.join(workdir, "config.json")):
    fail(f"--workdir={workdir} is not a longjax run directory (it has no config.json)")
  return argv[:1] + [f"--config={SAVED_RUN_CONFIG}:{workdir}"] + argv[1:]


def fail(message: str, code: int = 2):
  """Prints one line to stderr and exits: no traceback for a user's mistake."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def start():
  """First thing in train, evaluate and sample: quiet logs, and keep freed host memory for reuse
  (`longjax.host_memory`; before JAX starts its threads, which is why it is here)."""
  quiet_logs()
  from longjax import host_memory  # pylint: disable=g-import-not-at-top (fast --help)
  host_memory.reuse_freed_memory()


def quiet_logs():
  """Orbax and JAX log every checkpoint step at INFO; show warnings only unless -v is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
