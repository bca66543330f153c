"""Running a suite: its cases (each in a child process), the peak, derived figures, the report.

Every suite has the same shape (`run_suite_with`): record the machine, set the memory budget,
measure the matmul peak, run the cases, derive ratios and utilisation, write OUT (JSON) and
OUT.md (`longjax.benchmarks.reports`), then the plots. Finished cases are kept in
OUT.partial.jsonl as they finish, so an interrupted suite resumes where it stopped when the same
command runs again (`resumable`).
"""

import contextlib
import contextvars
import json
import os

from longjax.benchmarks import peers
from longjax.benchmarks import processes
from longjax.benchmarks import reports
from longjax.benchmarks import rss
from longjax.benchmarks.machine import machine_info
from longjax.benchmarks.peak import measure_peak
from longjax.benchmarks.peak import peak_gflops
from longjax.benchmarks.progress import progress


# Where `run_cases` appends each finished case while a suite runs (`resumable`), or None.
_PARTIAL = contextvars.ContextVar("partial_results", default=None)


def partial_path(out: str) -> str:
  """The file a suite writing OUT keeps its finished cases in until the report is written."""
  return out + ".partial.jsonl"


@contextlib.contextmanager
def resumable(out: str, identity: dict):
  """Keeps every finished case in `partial_path(out)` (one JSON line each) while the block runs.

  An interrupted suite loses nothing: the same command (same `identity`: suite, sizes, budget)
  finds the file and `run_cases` reuses the cases it holds instead of running them again. A file
  from another command is replaced. The caller deletes the file once the report is written.

  Yields:
    The number of cases reused so far (a one-element list, updated by `run_cases`).
  """
  path = partial_path(out)
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      lines = [json.loads(line) for line in f if line.strip()]
    if lines and lines[0].get("identity") == identity:
      done = {line["key"]: line["result"] for line in lines[1:]}
  if not done:
    with open(path, "w") as f:
      f.write(json.dumps({"identity": identity}) + "\n")
  reused = [0]
  token = _PARTIAL.set((path, done, reused))
  try:
    yield reused
  finally:
    _PARTIAL.reset(token)


def _case_key(module: str, case: dict) -> str:
  return json.dumps([module, case["function"], case["labels"]], sort_keys=True)


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
  no_torch = peers.torch_missing(torch_needs)
  partial = _PARTIAL.get()
  results = []
  bar = progress(cases, total=len(cases), desc=desc)
  for case in bar:
    if hasattr(bar, "set_postfix_str"):
      bar.set_postfix_str(" ".join(f"{v}" for v in case["labels"].values()))
    key = _case_key(module, case)
    if partial is not None and key in partial[1]:
      results.append(partial[1][key])  # finished by an interrupted run of the same command
      partial[2][0] += 1
      continue
    if "skip" in case:
      result = {"status": "skipped", "reason": case["skip"]}
    elif case.get("torch") and no_torch:
      result = {"status": "skipped", "reason": no_torch}  # no child needed to find that out
    else:
      torch = case.get("torch", False)
      result = processes.run_case(module, case["function"], case["kwargs"],
                                  timeout_s=timeout_s,
                                  preload=("torch",) if torch else jax_modules,
                                  env=peers.torch_env() if torch else None)
    results.append({**case["labels"], **result})
    if partial is not None:
      with open(partial[0], "a") as f:
        f.write(json.dumps({"key": key, "result": results[-1]}) + "\n")
  return results


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
  budget = rss.memory_budget_bytes(memory_budget_gb)
  peak = measure_peak(sizes, timeout_s=300, include_torch=peers.torch_missing() is None)
  ceiling = peak_gflops(peak)
  identity = {"suite": suite, "sizes": sizes, "argv": list(argv[1:])}
  with resumable(out, identity) as reused:
    results = run(budget)
  summary = derive(results, ceiling)
  resumed = ([f"Resumed: {reused[0]} of {len(results)} cases were measured by an earlier, "
              f"interrupted run of this command (`{partial_path(out)}`).\n"] if reused[0] else [])
  md = "\n".join([reports.header_markdown(suite, sizes, machine, peak, budget), *resumed,
                  markdown(results, summary)])
  report = {"suite": suite, "sizes": sizes, "machine": machine, "memory_budget_bytes": budget,
            "peak": peak, "peak_f32_gflops_per_s": ceiling, "cases": results,
            "resumed_cases": reused[0], **summary}
  reports.write_report(out, report, md)  # before plotting: a plotting failure loses nothing
  os.remove(partial_path(out))
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
