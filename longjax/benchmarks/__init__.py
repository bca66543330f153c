"""Benchmarks behind `python -m experiments.benchmark --suite=NAME`.

Each suite is a function `(sizes, out, *, argv, make_plots, ...) -> markdown` that measures the
matmul peak first (`peak.measure_peak`), runs every case in its own child process, and writes
OUT (JSON) and OUT.md (and plots). Suites: "peak" (the matmul ceiling alone), "kernels", "train",
"decode", "memory", "mixers", "retrieval".
"""

from longjax.benchmarks import decode
from longjax.benchmarks import flops
from longjax.benchmarks import kernels
from longjax.benchmarks import lm
from longjax.benchmarks import memory
from longjax.benchmarks import mixers
from longjax.benchmarks import retrieval
from longjax.benchmarks import suites
from longjax.benchmarks import train

SUITES = {"peak": suites.run_peak_suite, "kernels": kernels.run_suite, "train": train.run_suite,
          "decode": decode.run_suite, "memory": memory.run_suite, "mixers": mixers.run_suite,
          "retrieval": retrieval.run_suite}
SIZES = tuple(kernels.SIZES)

__all__ = ["SIZES", "SUITES", "decode", "flops", "kernels", "lm", "memory", "mixers", "retrieval",
           "train"]
