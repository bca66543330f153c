"""Running a suite: its cases (each in a child process), the peak, derived figures, the report.

Every suite has the same shape (`run_suite_with`): record the machine, set the memory budget,
measure the matmul peak, run the cases, derive ratios and utilisation, write OUT (JSON) and
OUT.md (`longjax.benchmarks.reports`), then the plots.
"""

import os

from longjax.benchmarks import peers
from longjax.benchmarks import processes
from longjax.benchmarks import reports
from longjax.benchmarks import rss
from longjax.benchmarks.machine import machine_info
from longjax.benchmarks.peak import measure_peak
from longjax.benchmarks.peak import peak_gflops
from longjax.benchmarks.progress import progress


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
      result = processes.run_case(module, case["function"], case["kwargs"],
                                  timeout_s=timeout_s,
                                  preload=("torch",) if torch else jax_modules,
                                  env=peers.torch_env() if torch else None)
    results.append({**case["labels"], **result})
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
