"""One child process per benchmark case.

Every case runs in its own child process (`run_case`), so that
  * an out-of-memory kill or a crash ends that case only, and is recorded as such;
  * the peak resident set size of the case is its own (VmHWM of the child's address space, see
    `rss.peak_rss_mib`; `getrusage(RUSAGE_CHILDREN)` would give the maximum over all children);
  * a case that runs past its time limit is killed and recorded as a timeout.

A case is a function `f(**kwargs) -> dict` in an importable module; the child imports it, calls
it and writes the dict as JSON. Inside a case, `longjax.benchmarks.timing` times it and refuses
(`timing.OutOfBudget`) a JAX case whose compiled footprint exceeds the memory budget, which the
child reports as such instead of swapping or being killed.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from longjax import host_memory
from longjax.benchmarks import timing
from longjax.benchmarks.rss import peak_rss_mib


class Skip(Exception):
  """A case cannot run here (e.g. torch is not installed); the message says why."""


def _classify(exc: BaseException) -> tuple[str, str]:
  """(status, one-line reason) for an exception raised inside a case."""
  text = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
  if isinstance(exc, timing.OutOfBudget):
    return "oom", f"not run: {exc.args[0]}"
  if isinstance(exc, Skip):
    return "skipped", str(exc)
  if isinstance(exc, MemoryError) or any(
      s in str(exc) for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                              "DefaultCPUAllocator: can't allocate")):
    return "oom", text
  return "error", text


def child_main(argv: list[str]) -> None:
  """Child side of `run_case`: argv = [request.json, result.json]."""
  with open(argv[0]) as f:
    request = json.load(f)
  # As the entry points do, for both sides of a comparison (the HF peer's step is ~5% faster
  # with it, longjax's up to ~25%: docs/benchmarks.md).
  if request.get("reuse_freed_memory", True):
    host_memory.reuse_freed_memory()
  result = {"rss_base_mib": None, "load_average_start": os.getloadavg()[0]}
  try:
    for name in request.get("preload", ()):
      __import__(name)
    module = __import__(request["module"], fromlist=[request["function"]])
    fn = getattr(module, request["function"])
    # After the framework's imports: the case's own arrays and programs are peak - base.
    result["rss_base_mib"] = peak_rss_mib()
    result.update(fn(**request["kwargs"]))
    result.setdefault("status", "ok")
  except Exception as exc:  # pylint: disable=broad-except  (recorded, never fatal)
    result["status"], result["reason"] = _classify(exc)
    if isinstance(exc, timing.OutOfBudget) and len(exc.args) > 1:
      result.update(exc.args[1])  # the compiled footprint that was refused
    if result["status"] == "error":
      traceback.print_exc()
  result["rss_peak_mib"] = peak_rss_mib()
  # Other jobs on a shared machine skew timings (a 2-thread OpenMP or Eigen pool on 2 busy
  # cores stalls at every barrier): the load average goes into the report beside each case.
  result["load_average_end"] = os.getloadavg()[0]
  with open(argv[1], "w") as f:
    json.dump(result, f)


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../longjax
_REPO_ROOT = os.path.dirname(_PACKAGE_DIR)
# The child registers `longjax` as a bare package instead of running longjax/__init__.py: the
# curated API imports the model, data pipeline and TFDS (~1.5 s per case, more on a loaded
# machine), which no case needs; `longjax.ops` and the rest import as usual. A torch case then
# imports neither jax nor flax, so its peak RSS is torch's own.
_BOOTSTRAP = """import sys, types
package = types.ModuleType("longjax")
package.__path__ = [sys.argv[1]]
sys.modules["longjax"] = package
from longjax.benchmarks import processes
processes.child_main(sys.argv[2:])
"""


def run_case(module: str, function: str, kwargs: dict, *, timeout_s: float,
             preload: tuple[str, ...] = (), env: dict | None = None,
             reuse_freed_memory: bool = True) -> dict:
  """Runs `module.function(**kwargs)` in a child process and returns its result dict.

  `preload` names modules the child imports before it notes its base RSS ("rss_base_mib"), e.g.
  the framework the case runs on; `env` adds environment variables for the child.
  `reuse_freed_memory`: the child calls `host_memory.reuse_freed_memory()` first, as the entry
  points do. Cases that measure memory turn it off: keeping freed memory raises the peak RSS.

  The dict always has "status" ("ok", "skipped", "oom", "timeout", "killed" or "error"), a
  "reason" unless ok, "wall_s" (the whole child, imports and compilation included) and
  "rss_peak_mib" (the child's peak resident set size: its own VmHWM at the end, or for a child
  that was killed the last value the parent read while polling).
  """
  with tempfile.TemporaryDirectory(prefix="longjax-bench-") as tmp:
    request, output, log = (os.path.join(tmp, n) for n in ("request.json", "result.json", "log"))
    with open(request, "w") as f:
      json.dump({"module": module, "function": function, "kwargs": kwargs,
                 "preload": list(preload), "reuse_freed_memory": reuse_freed_memory}, f)
    start = time.perf_counter()
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_REPO_ROOT, env.get("PYTHONPATH")]))
    with open(log, "w") as log_file:
      # A new session: a timeout kills the child and anything it started, nothing else.
      proc = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP, _PACKAGE_DIR, request, output],
                              stdout=log_file, stderr=subprocess.STDOUT, env=env,
                              start_new_session=True)
    status = polled_rss = None
    try:
      while status is None:
        polled_rss = peak_rss_mib(proc.pid) or polled_rss
        try:
          status = proc.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
          if time.perf_counter() - start > timeout_s:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = "timeout"
    except BaseException:  # Ctrl-C reaches only our session: take the child down with us
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
      raise
    wall = time.perf_counter() - start
    result = {}
    if os.path.exists(output):
      with open(output) as f:
        result = json.load(f)
    elif status == "timeout":
      result = {"status": "timeout", "reason": f"ran past the {timeout_s:.0f} s limit"}
    else:
      code = status
      with open(log) as f:
        tail = f.read()[-2000:]
      if code == -signal.SIGKILL:
        result = {"status": "killed", "reason": "killed by SIGKILL (likely the kernel's "
                                                 "out-of-memory killer)"}
      else:
        last = tail.strip().splitlines()[-1] if tail.strip() else ""
        result = {"status": "error", "reason": f"child exited with {code}: {last[:300]}"}
    if result.get("status") == "error" and "log_tail" not in result:
      with open(log) as f:
        result["log_tail"] = f.read()[-2000:]
  result["wall_s"] = wall
  if result.get("rss_peak_mib") is None:
    result["rss_peak_mib"] = polled_rss
  return result
