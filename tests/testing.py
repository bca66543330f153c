"""Shared test fixtures: a small local corpus and tiny configs.

The corpus is ~40 files of this interpreter's standard library copied into a temp folder once per
machine, so tests exercise the real builder and pipeline on real text without building the whole
standard library.
"""

import fcntl
import os
import shutil
import sys
import sysconfig
import tempfile

from configs import quickstart

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = os.path.join(tempfile.gettempdir(), f"longjax-tests-{os.getuid()}")
_PACKAGES = ("json", "email", "logging", "importlib", "urllib", "http", "concurrent")


def corpus_dir() -> str:
  """A folder of ~60 standard-library .py files (created once)."""
  target = os.path.join(_ROOT, "corpus")
  if os.path.isdir(target):
    return target
  staging = tempfile.mkdtemp(dir=_ensure_root())
  stdlib = sysconfig.get_paths()["stdlib"]
  for package in _PACKAGES:
    source = os.path.join(stdlib, package)
    for name in sorted(os.listdir(source)):
      if name.endswith(".py"):
        os.makedirs(os.path.join(staging, package), exist_ok=True)
        shutil.copy(os.path.join(source, name), os.path.join(staging, package, name))
  try:
    os.rename(staging, target)  # atomic: parallel test workers never see half a corpus
  except OSError:
    shutil.rmtree(staging)
  return target


def _ensure_root() -> str:
  os.makedirs(_ROOT, exist_ok=True)
  return _ROOT


def _build_dataset_once(source_dir: str, tfds_dir: str, validation_percent: int) -> None:
  # pytest-xdist workers would otherwise race to build the same TFDS dataset on a fresh machine.
  from longjax.data.builders import text_dir  # pylint: disable=g-import-not-at-top
  with open(os.path.join(_ensure_root(), "build.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    text_dir.load_text_dir(source_dir=source_dir, validation_percent=validation_percent,
                           data_dir=tfds_dir)


def tiny_config(**overrides):
  """configs/quickstart.py:tiny on the test corpus, with dotted-name overrides."""
  c = quickstart.get_config("tiny")
  c.data.source_dir = corpus_dir()
  c.data.tfds_dir = os.path.join(_ROOT, "tfds")
  c.data.validation_percent = 20
  _build_dataset_once(c.data.source_dir, c.data.tfds_dir, c.data.validation_percent)
  c.eval.lengths = "1x,4x"
  c.eval.num_sequences = 2
  c.eval.batch_size = 2
  return apply_overrides(c, overrides)


def apply_overrides(config, overrides: dict):
  """Sets dotted-name fields, like --config.a.b=v on the command line; returns `config`."""
  config.update_from_flattened_dict(dict(overrides))
  return config


def cli_overrides(config) -> list[str]:
  """The --config.* flags that turn configs/quickstart.py:tiny into `config`."""
  return [f"--config.data.source_dir={config.data.source_dir}",
          f"--config.data.tfds_dir={config.data.tfds_dir}",
          f"--config.data.validation_percent={config.data.validation_percent}",
          f"--config.eval.lengths={config.eval.lengths}",
          f"--config.eval.num_sequences={config.eval.num_sequences}",
          f"--config.eval.batch_size={config.eval.batch_size}"]


def second_write_page_faults(mib: int) -> int:
  """Minor page faults of writing a malloc'd block of `mib` MiB a second time: the block is
  malloc'd, written and freed, then malloc'd and written again. Fresh pages fault (about one per
  4 KiB, fewer with transparent huge pages); pages the process kept do not."""
  import ctypes  # pylint: disable=g-import-not-at-top
  import ctypes.util  # pylint: disable=g-import-not-at-top
  import resource  # pylint: disable=g-import-not-at-top
  libc = ctypes.CDLL(ctypes.util.find_library("c"))
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  faults = []
  for _ in range(2):
    block = libc.malloc(mib * 2**20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(block, 1, mib * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)
  return faults[1]


def python_env() -> dict:
  """Environment for a child `python -m experiments.*` that finds this checkout."""
  env = dict(os.environ)
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


PYTHON = sys.executable
_servers = {}


def run_module(*argv: str, env: dict | None = None, timeout: int = 600):
  """`python -m argv[0] argv[1:]` in the checkout: a process of its own, forked from a server
  that imported jax, flax and longjax once (tests/entry_point_server.py), instead of a cold
  start that spends ~3 s on imports. Returns returncode, stdout and stderr.

  `env` defaults to `python_env()`; one server per distinct set of JAX_*/XLA_* variables (jax
  reads those at import), started on first use and stopped when the test process exits.
  """
  from tests import entry_point_server  # pylint: disable=g-import-not-at-top
  env = python_env() if env is None else env
  key = tuple(sorted(entry_point_server.jax_variables(env).items()))
  if key not in _servers:
    import atexit  # pylint: disable=g-import-not-at-top
    server = entry_point_server.EntryPointServer(PYTHON, env, REPO_ROOT)
    atexit.register(server.close)
    _servers[key] = server
  return _servers[key].run(list(argv), cwd=REPO_ROOT, env=env, timeout=timeout)


def tree_bytes(path: str) -> dict[str, bytes]:
  """{relative path: SHA-256} of every file under `path` (b"dir" for a folder): equal iff no
  file or folder was added, removed or changed (modification times aside)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  digests = {}
  for root, dirs, names in os.walk(path):
    for name in dirs:
      digests[os.path.relpath(os.path.join(root, name), path) + "/"] = b"dir"
    for name in names:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        digests[os.path.relpath(full, path)] = hashlib.sha256(f.read()).digest()
  return digests


# A tiny run trained once per test process and shared (read-only) by the tests that damage or
# resume copies of it; those tests share one xdist group, so one worker trains it.
TRAINED_RUN_GROUP = "trained_run"
TRAINED_RUN_OVERRIDES = {"train.steps": 6, "train.checkpoint_every": 3, "train.log_every": 1,
                         "eval.lengths": "1x"}
_trained_run = []


def trained_run() -> str:
  """The workdir of `tiny_config(**TRAINED_RUN_OVERRIDES)` trained (checkpoints 3 and 6)."""
  if not _trained_run:
    from longjax import experiment  # pylint: disable=g-import-not-at-top
    workdir = os.path.join(tempfile.mkdtemp(dir=_ensure_root()), "run")
    experiment.train_and_evaluate(tiny_config(**TRAINED_RUN_OVERRIDES), workdir, progress=False)
    _trained_run.append(workdir)
  return _trained_run[0]


def copy_of_trained_run(parent: str) -> str:
  """A copy of `trained_run()` under `parent`, for a test to change."""
  workdir = os.path.join(parent, "run")
  shutil.copytree(trained_run(), workdir)
  return workdir


def checkpoint_arrays(workdir: str, step: int) -> dict:
  """{'/params/...' path: numpy array} of the train state in a run's checkpoint of `step`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                             item_names=("state", "data", "config")) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))

  def flatten(tree, prefix=""):
    if isinstance(tree, dict):
      for k, v in tree.items():
        yield from flatten(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
      for i, v in enumerate(tree):
        yield from flatten(v, f"{prefix}/{i}")
    else:
      yield prefix, np.asarray(tree)

  return dict(flatten(restored["state"]))


def data_position(workdir: str, step: int) -> dict:
  """The data iterator's saved position in a run's checkpoint of `step` (one process)."""
  import json  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "checkpoints", str(step), "data", "process_0-of-1.json")
  with open(path, encoding="utf-8") as f:
    return json.load(f)
