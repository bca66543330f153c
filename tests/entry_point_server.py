"""Runs `python -m experiments.X ...` commands for tests, each in a fresh forked process.

A command-line run spends ~3 s importing jax, flax and longjax before it reads its first flag;
the error-path tests start ~70 of them. This server imports those libraries once, then forks one
child per command: the child sets `sys.argv`, runs the module as `__main__` (as `python -m`
does), runs the `atexit` handlers and exits with the module's exit code, its stdout and stderr
going to files the server reads back. The child is an ordinary process of its own: its flags,
files, exit code and output are the command's. What it shares with a `python -m` run started
from scratch is everything but the import time; no backend is initialised before the fork (only
modules are imported), so no JAX thread or device state crosses it.

Protocol (one JSON object per line): the test writes {"argv": [module, *args], "cwd": path,
"env": {...}, "timeout": seconds} and reads {"returncode": int, "stdout": str, "stderr": str}.
Start it with `EntryPointServer()`; `run(...)` mirrors `subprocess.run`'s result fields.
"""

import atexit
import dataclasses
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback

# What every entry point imports before reading its flags (the expensive part).
_PRELOAD = ("jax", "jax.numpy", "flax.nnx", "optax", "longjax", "longjax.configuration",
            "longjax.defaults", "longjax.experiment")


@dataclasses.dataclass
class Completed:
  returncode: int
  stdout: str
  stderr: str


def _run_child(request: dict, out_path: str, err_path: str) -> None:
  """In the forked child: becomes `python -m argv[0] argv[1:]`; never returns."""
  code = 1
  try:
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)  # not the server's request pipe
    os.dup2(null, 0)
    os.close(null)
    for fd, path in ((1, out_path), (2, err_path)):
      target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
      os.dup2(target, fd)
      os.close(target)
    signal.alarm(request["timeout"])  # SIGALRM's default action ends a hung child
    module, *args = request["argv"]
    sys.argv = [module, *args]
    try:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      if e.code is None:
        code = 0
      elif isinstance(e.code, int):
        code = e.code
      else:  # sys.exit("message"): Python prints it and exits with 1
        print(e.code, file=sys.stderr)
        code = 1
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()  # what Python prints for an uncaught exception
      code = 1
    atexit._run_exitfuncs()  # pylint: disable=protected-access
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


def serve() -> None:
  for name in _PRELOAD:
    __import__(name)
  scratch = tempfile.mkdtemp(prefix="longjax-entry-points-")
  replies = sys.stdout
  for line in sys.stdin:
    request = json.loads(line)
    out_path, err_path = os.path.join(scratch, "out"), os.path.join(scratch, "err")
    replies.flush()
    pid = os.fork()
    if pid == 0:
      _run_child(request, out_path, err_path)
    _, status = os.waitpid(pid, 0)
    returncode = os.waitstatus_to_exitcode(status)
    with open(out_path, errors="replace") as f:
      stdout = f.read()
    with open(err_path, errors="replace") as f:
      stderr = f.read()
    replies.write(json.dumps({"returncode": returncode, "stdout": stdout, "stderr": stderr})
                  + "\n")
    replies.flush()


def jax_variables(env: dict) -> dict:
  return {k: v for k, v in env.items() if k.startswith(("JAX_", "XLA_"))}


class EntryPointServer:
  """A running server (one per test process that needs it); `close()` stops it."""

  def __init__(self, python: str, env: dict, cwd: str):
    # jax reads its JAX_* and XLA_* variables when the server imports it, before any request.
    self._jax_env = jax_variables(env)
    self._proc = subprocess.Popen([python, "-m", "tests.entry_point_server"], cwd=cwd, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

  def run(self, argv: list[str], *, cwd: str, env: dict, timeout: int = 300) -> Completed:
    """`python -m argv[0] argv[1:]` with this working directory and environment."""
    if jax_variables(env) != self._jax_env:
      raise ValueError("the JAX_*/XLA_* variables differ from the server's: jax read those at "
                       "import; start a server with this environment")
    request = {"argv": list(argv), "cwd": cwd, "env": env, "timeout": int(timeout)}
    self._proc.stdin.write(json.dumps(request) + "\n")
    self._proc.stdin.flush()
    reply = self._proc.stdout.readline()
    if not reply:
      raise RuntimeError(f"the entry point server died (exit code {self._proc.wait()})")
    return Completed(**json.loads(reply))

  def close(self) -> None:
    self._proc.stdin.close()
    self._proc.wait(timeout=60)


if __name__ == "__main__":
  serve()
