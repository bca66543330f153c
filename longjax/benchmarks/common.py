"""Benchmark plumbing: one child process per case, the matmul peak, running a suite.

Every case runs in its own child process (`run_case`), so that
  * an out-of-memory kill or a crash ends that case only, and is recorded as such;
  * the peak resident set size of the case is its own (VmHWM of the child's address space, see
    `peak_rss_mib`; `getrusage(RUSAGE_CHILDREN)` would give the maximum over all children);
  * a case that runs past its time limit is killed and recorded as a timeout.

A case is a function `f(**kwargs) -> dict` in an importable module; the child imports it, calls
it and writes the dict as JSON. Inside a case, `longjax.benchmarks.timing` times it and refuses
(`timing.OutOfBudget`) a JAX case whose compiled footprint exceeds the memory budget, which the
child reports as such instead of swapping or being killed; `longjax.benchmarks.reports` writes
the tables.
"""

import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback

from longjax import host_memory
from longjax.benchmarks import reports
from longjax.benchmarks import timing


class Skip(Exception):
  """A case cannot run here (e.g. torch is not installed); the message says why."""


def _proc_status_mib(pid: int | str, field: str) -> float | None:
  """A "<field>: <n> kB" line of /proc/<pid>/status in MiB; None where /proc is unavailable."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024
  except (OSError, ValueError):
    pass
  return None


def peak_rss_mib(pid: int | str = "self") -> float | None:
  """A process's peak resident set size since its exec, in MiB: VmHWM from /proc.

  Not `getrusage`: Linux carries ru_maxrss across fork and exec, so a child's would start at
  the parent's size (the benchmark's parent holds jax and the library, ~0.3 GiB); VmHWM belongs
  to the address space, which exec replaces. None where /proc is unavailable.
  """
  return _proc_status_mib(pid, "VmHWM")


def current_rss_mib() -> float | None:
  """This process's resident set size now (VmRSS), in MiB; None where /proc is unavailable."""
  return _proc_status_mib("self", "VmRSS")


def reset_peak_rss() -> bool:
  """Resets this process's VmHWM to its current RSS (Linux's clear_refs "5"); False if not.

  So that the peak of one phase (running a step) is not the peak of an earlier one (compiling).
  """
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


# ---------------------------------------------------------------------------------------------
# One child process per case.


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
from longjax.benchmarks import common
common.child_main(sys.argv[2:])
"""


def torch_env() -> dict:
  """Environment for a PyTorch child: OpenMP threads that sleep instead of spinning at a barrier.

  On a 2-core machine shared with other jobs, libgomp's default (spin, then sleep) collapses
  when a core is taken: torch SDPA fwd+bwd at T=128 took 84 ms instead of 2 ms at load average
  4 on 2 cores, with OMP_WAIT_POLICY=PASSIVE 2 ms. The benchmark compares implementations, not
  the scheduler, so torch gets the setting unless the user has chosen one (recorded in the JSON).
  """
  return {} if "OMP_WAIT_POLICY" in os.environ else {"OMP_WAIT_POLICY": "PASSIVE"}


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


def torch_missing(needs: tuple[str, ...] = ("torch",)) -> str | None:
  """Why the PyTorch peers cannot run here (the `bench` extra is missing), or None.

  `needs`: the packages the peers import, e.g. ("torch", "transformers") for the HF models.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  for name in needs:
    if importlib.util.find_spec(name) is None:
      return f"{name} is not installed; pip install -e '.[bench]'"
  return None


def run_cases(module: str, cases: list[dict], *, desc: str, timeout_s: float,
              jax_modules: tuple[str, ...] = ("jax",),
              torch_needs: tuple[str, ...] = ("torch",)) -> list[dict]:
  """Runs `module.<case["function"]>(**case["kwargs"])` per case, each in a child process.

  A case is a dict with "function", "kwargs", "labels" (copied into its result) and optionally
  "skip" (a reason: not run) and "torch" (True: a PyTorch peer, skipped with the reason when the
  `bench` extra is missing, and run with `torch_env`). Shows a progress bar.

  Returns:
    One result dict per case, in order: its labels, then what `run_case` returned.
  """
  no_torch = torch_missing(torch_needs)
  results = []
  bar = progress(cases, total=len(cases), desc=desc)
  for case in bar:
    if hasattr(bar, "set_postfix_str"):
      bar.set_postfix_str(" ".join(f"{v}" for v in case["labels"].values()))
    if "skip" in case:
      result = {"status": "skipped", "reason": case["skip"]}
    elif case.get("torch") and no_torch:
      result = {"status": "skipped", "reason": no_torch}  # no child needed to find that out
    else:
      torch = case.get("torch", False)
      result = run_case(module, case["function"], case["kwargs"], timeout_s=timeout_s,
                        preload=("torch",) if torch else jax_modules,
                        env=torch_env() if torch else None)
    results.append({**case["labels"], **result})
  return results


def memory_budget_bytes(memory_budget_gb: float | None) -> int:
  """The per-case compiled-footprint budget: the flag, else 75% of the memory available now."""
  if memory_budget_gb:
    return int(memory_budget_gb * 2**30)
  return int(0.75 * (available_memory_bytes() or 2**40))


# ---------------------------------------------------------------------------------------------
# The matmul peak (a case like any other).

PEAK_SIZES = {"tiny": 1024, "small": 2048, "full": 4096}


def matmul_case(dtype: str, n: int, repeats: int = 5, framework: str = "jax") -> dict:
  """GFLOP/s of an [n, n] x [n, n] matmul: jitted JAX in `dtype`, or PyTorch (f32)."""
  flops = 2 * n**3
  if framework == "torch":
    torch = import_torch()
    a, b = (torch.randn(n, n, dtype=getattr(torch, dtype)) for _ in range(2))
    result = timing.time_callable(lambda: a @ b, repeats=repeats, budget_s=30)
  else:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
    result = timing.time_jax(lambda x, y: x @ y, (a, b), repeats=repeats, budget_s=30,
                             memory_budget_bytes=None)
  return {**result, "n": n, "dtype": dtype, "flops": flops,
          "gflops_per_s": flops / result["time_s"] / 1e9}


def measure_peak(sizes: str, *, timeout_s: float, include_torch: bool = True) -> dict:
  """Matmul GFLOP/s in child processes: JAX f32, JAX bf16 and, as a reference, PyTorch f32."""
  n = PEAK_SIZES[sizes]
  runs = {"f32": ("float32", "jax"), "bf16": ("bfloat16", "jax")}
  if include_torch:
    runs["torch_f32"] = ("float32", "torch")
  peak = {}
  for name, (dtype, framework) in progress(runs.items(), desc="peak"):
    peak[name] = run_case(__name__, "matmul_case",
                          {"dtype": dtype, "n": n, "framework": framework}, timeout_s=timeout_s,
                          preload=(framework,), env=torch_env() if framework == "torch" else None)
  return peak


def peak_gflops(peak: dict) -> float | None:
  """The f32 ceiling used for utilisation columns: the jitted JAX f32 matmul's GFLOP/s."""
  f32 = peak.get("f32", {})
  return f32.get("gflops_per_s") if f32.get("status") == "ok" else None


# ---------------------------------------------------------------------------------------------
# Peers, machine, progress, reports.


def import_torch():
  """Imports torch, or raises `Skip` with the reason (it is in the optional `bench` extra)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise Skip(f"torch is not installed ({e}); pip install -e '.[bench]'") from e
  return torch


def machine_info(argv: list[str]) -> dict:
  """Where and how the numbers were taken."""
  import jax  # pylint: disable=g-import-not-at-top
  info = {"command": " ".join(["python -m experiments.benchmark"] + argv[1:]),
          "cpu_count": os.cpu_count(), "platform": platform.platform(),
          "processor": _cpu_model(), "python": platform.python_version(),
          "jax": jax.__version__, "jax_backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average_at_start": os.getloadavg(),
          "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
  try:  # the version without importing torch into the parent (seconds, and its memory)
    info["torch"] = importlib.metadata.version("torch")
    info["torch_child_env"] = torch_env()
  except importlib.metadata.PackageNotFoundError:
    info["torch"] = None
  try:
    with open("/proc/meminfo") as f:
      info["mem_total_gib"] = int(f.readline().split()[1]) / 2**20
  except OSError:
    pass
  return info


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def available_memory_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (None elsewhere)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def progress(iterable, total: int | None = None, desc: str = ""):
  """A tqdm progress bar on stderr, or plain one-line updates when tqdm is missing."""
  try:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    return tqdm.tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, file=sys.stderr)
  except ImportError:
    return _plain_progress(iterable, total, desc)


def _plain_progress(iterable, total, desc):
  items = list(iterable)
  for i, item in enumerate(items):
    print(f"{desc} {i + 1}/{total or len(items)}", file=sys.stderr, flush=True)
    yield item


def run_suite_with(suite: str, sizes: str, out: str, *, argv: list[str],
                   memory_budget_gb: float | None, run, derive, markdown, plot=None) -> str:
  """The shape every suite shares: machine, budget, peak, cases, derived figures, report.

  Args:
    suite, sizes, out, argv: as given to the CLI.
    memory_budget_gb: per-case compiled-footprint budget (`memory_budget_bytes`).
    run: budget bytes -> result dicts (runs the cases).
    derive: (results, peak f32 GFLOP/s or None) -> summary dict (adds ratios in place).
    markdown: (results, summary) -> the suite's tables.
    plot: (results, path stem) -> PNG paths, or None for no plots.

  Returns:
    The markdown report (also written beside OUT).
  """
  machine = machine_info(argv)
  budget = memory_budget_bytes(memory_budget_gb)
  peak = measure_peak(sizes, timeout_s=300, include_torch=torch_missing() is None)
  ceiling = peak_gflops(peak)
  results = run(budget)
  summary = derive(results, ceiling)
  md = "\n".join([reports.header_markdown(suite, sizes, machine, peak, budget),
                  markdown(results, summary)])
  report = {"suite": suite, "sizes": sizes, "machine": machine, "memory_budget_bytes": budget,
            "peak": peak, "peak_f32_gflops_per_s": ceiling, "cases": results, **summary}
  reports.write_report(out, report, md)  # before plotting: a plotting failure loses nothing
  if plot is not None:
    report["plots"] = plot(results, os.path.splitext(out)[0])
    reports.write_report(out, report, md)
  return md


def run_peak_suite(sizes: str, out: str, *, argv: list[str], **unused) -> str:
  """`--suite=peak`: the matmul ceiling alone; writes OUT (JSON) and OUT.md."""
  del unused
  import importlib.util  # pylint: disable=g-import-not-at-top
  machine = machine_info(argv)
  peak = measure_peak(sizes, timeout_s=300,
                      include_torch=importlib.util.find_spec("torch") is not None)
  md = reports.header_markdown("peak", sizes, machine, peak)
  reports.write_report(out, {"suite": "peak", "sizes": sizes, "machine": machine, "peak": peak,
                             "peak_f32_gflops_per_s": peak_gflops(peak)}, md)
  return md
