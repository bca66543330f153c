"""Plumbing shared by the entry points."""

import ast
import contextlib
import os
import sys

from absl import app
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


@contextlib.contextmanager
def training_errors():
  """The mistakes a training run reports before it writes (a config value, a workdir of
  another run, damaged checkpoints, a bad text source) and a diverging loss: one line each."""
  from longjax import configuration  # pylint: disable=g-import-not-at-top (fast --help)
  from longjax.data import corpus  # pylint: disable=g-import-not-at-top
  from longjax.training import checkpoints, resume, trainer  # pylint: disable=g-import-not-at-top
  try:
    yield
  except configuration.ConfigError as e:
    fail(f"config: {e}")
  except (resume.ResumeError, checkpoints.CheckpointError, corpus.SourceError) as e:
    fail(str(e))
  except trainer.NonFiniteLossError as e:
    fail(str(e), code=1)


def load_run_or_fail(workdir: str, config, step: int | None = None):
  """`longjax.runs.load_run`, with each reason it cannot load the run as one line and exit 2."""
  from longjax import configuration, runs  # pylint: disable=g-import-not-at-top (fast --help)
  from longjax.data import corpus  # pylint: disable=g-import-not-at-top
  from longjax.training import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    return runs.load_run(workdir, config, step=step)
  except configuration.ConfigError as e:
    fail(f"config: {e}")
  except (FileNotFoundError, runs.SavedConfigError, checkpoints.CheckpointError,
          corpus.SourceError) as e:
    fail(str(e))


def memory_bytes() -> int:
  """Memory of the default device: its allocator limit on an accelerator, else host RAM."""
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"])
  return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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


def run(main) -> None:
  """`app.run(main)` for every entry point: a mistake in the flags (an unknown config field, a
  config file that does not load, a bad flag value) is one line and exit 2, not a traceback;
  Ctrl-C outside the training loop (which saves a checkpoint itself) is one line and exit 130.
  """
  try:
    app.run(main, flags_parser=_parse_flags)
  except KeyboardInterrupt:
    sys.stdout.flush()
    print("interrupted (Ctrl-C); what was saved is kept: rerun the same command to go on",
          file=sys.stderr)
    sys.stderr.flush()
    # No interpreter teardown: with XLA still compiling on its threads it can segfault.
    os._exit(130)  # pylint: disable=protected-access


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    args = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      _ = flags.FLAGS["config"].value.keys  # a config file that failed to load raises here
    return args
  except Exception as e:  # pylint: disable=broad-except (config files raise anything)
    fail(flag_error_line(e, argv))


def _unquote(text: str) -> str:
  """config_flags wraps KeyError messages in reprs, sometimes twice: "'\\'key\\'...'"."""
  while len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
    try:
      text = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      break
  return text


def flag_error_line(error: Exception, argv: list[str]) -> str:
  """One line for an error raised while parsing flags and loading the config file."""
  if "earlier failure to load" in str(error) and error.__cause__ is not None:
    error = error.__cause__  # config_flags re-raises the first failure under this wrapper
  config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
  lines = [line.strip() for line in _unquote(str(error)).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if any(line.startswith("Traceback") for line in lines):  # the config file's get_config raised
    return lines[0].split(" Error whilst parsing config file:")[0] + " " + lines[-1]
  if "has no attribute 'get_config'" in lines[0]:
    return f"--config={config}: the file defines no get_config(arg) function"
  if isinstance(error, SyntaxError):
    return f"--config={config}: {type(error).__name__}: {lines[0]}"
  if isinstance(error, (KeyError, AttributeError)) and len(lines[0].split()) == 1:
    key = lines[0].strip("'\"")
    flag = next((a.split("=", 1)[0] for a in argv
                 if a.startswith("--config.") and key in a.split("=", 1)[0].split(".")),
                "--config")
    hint = f" ({lines[1][0].lower()}{lines[1][1:]})" if len(lines) > 1 else ""
    return f"{flag}: no config field {key!r}{hint}"
  if isinstance(error, OSError) and config and "Failed loading config file" in lines[0]:
    return f"--config={config}: {lines[-1]}"
  return " ".join(lines)
