"""Benchmark longjax against what a researcher would otherwise use, peers in the same run.

  python -m experiments.benchmark --suite=kernels --out=docs/benchmarks/kernels_small.json \
      [--sizes=tiny|small|full] [--plot]
  python -m experiments.benchmark --suite=train|decode|memory --out=docs/benchmarks/X.json \
      --sizes=full [--plot]      # longjax vs HF LlamaForCausalLM (docs/benchmarks.md)
  python -m experiments.benchmark --suite=mixers --out=docs/benchmarks/mixers_small.json \
      --sizes=small --plot [--groups=attention,mamba2,mamba2_scan] [--lengths=2048,8192]
                                 # every mixer's train step, memory and decode vs length
  python -m experiments.benchmark --suite=retrieval --out=docs/benchmarks/retrieval_full.json \
      --sizes=full --plot        # decode ms/token vs cache length: full attention vs retrieval
  python -m experiments.benchmark --suite=peak --out=peak.json

Every run first measures the jitted matmul GFLOP/s (f32, bf16): the machine's ceiling, used for
the utilisation columns. Each case runs in its own child process (an out-of-memory case is
recorded, not fatal). Writes OUT (JSON: machine, peak, every case), OUT.md (the tables, also
printed) and, with --plot, OUT_<group>.png. PyTorch peers need the `bench` extra
(pip install -e '.[bench]'); without it they are recorded as skipped, with the reason.
"""

import sys

from absl import app
from absl import flags

from experiments import common

_SUITE = flags.DEFINE_enum("suite", "kernels",
                           ["peak", "kernels", "train", "decode", "memory", "mixers",
                            "retrieval"],
                           "Which benchmark suite.")
_OUT = flags.DEFINE_string("out", None, "Output JSON path; the markdown goes beside it (.md).")
_SIZES = flags.DEFINE_enum("sizes", "full", ["tiny", "small", "full"],
                           "Size set: tiny (smoke test, < 1 min), small (minutes), full.")
_PLOT = flags.DEFINE_bool("plot", False, "Also write PNG plots (time vs size, log-log).")
_MEMORY = flags.DEFINE_float("memory_budget_gb", None,
                             "Refuse cases whose compiled footprint exceeds this (default: 75% "
                             "of the memory available at the start).")
_TIMEOUT = flags.DEFINE_float("case_timeout_s", None,
                              "Kill a case after this many seconds (default: per size set).")
_GROUPS = flags.DEFINE_list("groups", None,
                            "kernels suite: a subset of attention,decode,linear,scan; mixers "
                            "suite: a subset of its rows (attention, NAME, NAME_scan, "
                            "mamba_pure, mamba2_pure, hf_mamba, hf_mamba2).")
_LENGTHS = flags.DEFINE_list("lengths", None,
                             "mixers suite: sequence lengths to run instead of the size set's "
                             "(its width, depth and repeats stay).")
flags.mark_flag_as_required("out")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  common.quiet_logs()
  from longjax import benchmarks  # pylint: disable=g-import-not-at-top (fast --help)
  kwargs = {}
  if _SUITE.value == "kernels":
    groups = _GROUPS.value or benchmarks.kernels.GROUPS
    unknown = set(groups) - set(benchmarks.kernels.GROUPS)
    if unknown:
      common.fail(f"--groups: unknown {sorted(unknown)}; choose from "
                  f"{','.join(benchmarks.kernels.GROUPS)}")
    kwargs = {"groups": tuple(groups)}
  if _SUITE.value == "mixers" and _GROUPS.value:
    unknown = set(_GROUPS.value) - set(benchmarks.mixers.ROWS)
    if unknown:
      common.fail(f"--groups: unknown {sorted(unknown)}; choose from "
                  f"{','.join(benchmarks.mixers.ROWS)}")
    kwargs = {"impls": tuple(_GROUPS.value)}
  if _LENGTHS.value:
    if _SUITE.value != "mixers":
      common.fail(f"--lengths applies to --suite=mixers only, not {_SUITE.value!r}")
    try:
      kwargs["lengths"] = [int(t) for t in _LENGTHS.value]
    except ValueError:
      common.fail(f"--lengths: {','.join(_LENGTHS.value)!r} is not a list of integers")
    if min(kwargs["lengths"]) < 1:
      common.fail(f"--lengths: every length must be >= 1, got {','.join(_LENGTHS.value)}")
  if _SUITE.value != "peak":
    kwargs.update(memory_budget_gb=_MEMORY.value, timeout_s=_TIMEOUT.value,
                  make_plots=_PLOT.value)
  md = benchmarks.SUITES[_SUITE.value](_SIZES.value, _OUT.value, argv=sys.argv, **kwargs)
  print(md)
  print(f"\nwrote {_OUT.value} and its .md", file=sys.stderr)


if __name__ == "__main__":
  common.run(main)
