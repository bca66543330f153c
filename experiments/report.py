"""Print a markdown summary of a finished run (the README's results tables come from this).

  python -m experiments.report --workdir=runs/quickstart [--label=NAME]
  python -m experiments.report --workdir=runs/quickstart --compare  # the --compare table
  python -m experiments.report --benchmarks=docs/benchmarks/train_small.json,...  # benchmarks
"""

import json
import os

from absl import app
from absl import flags

from experiments import common

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory written by experiments.train.")
_LABEL = flags.DEFINE_string("label", "", "Which evaluation (eval/perplexity[-LABEL].json).")
_COMPARE = flags.DEFINE_bool("compare", False, "Print the table of the last "
                             "`experiments.evaluate --compare` run (eval/compare.json) instead.")
_BENCHMARKS = flags.DEFINE_list("benchmarks", None, "Benchmark JSON files (experiments."
                                "benchmark --out): print the README's benchmark table instead.")


def compare_markdown(workdir: str) -> str:
  """One row per evaluated method, one column per context length (mean loss, nats/token)."""
  with open(os.path.join(workdir, "eval", "compare.json"), encoding="utf-8") as f:
    results = json.load(f)
  lengths = next(iter(results.values()))["lengths"]
  lines = ["| method | " + " | ".join(str(n) for n in lengths) + " |",
           "|---|" + "---:|" * len(lengths)]
  for method, result in results.items():
    lines.append(f"| `{method}` | " + " | ".join(f"{x:.3f}" for x in result["loss"]) + " |")
  return "\n".join(lines)


def markdown(workdir: str, label: str = "") -> str:
  suffix = f"-{label}" if label else ""
  with open(os.path.join(workdir, "eval", f"perplexity{suffix}.json"), encoding="utf-8") as f:
    sweep = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    metrics = [json.loads(line) for line in f if line.strip()]
  final = metrics[-1]
  speeds = [m["tokens_per_sec"] for m in metrics if m.get("tokens_per_sec") is not None]
  lines = [
      f"Validation loss at the training length, packed batches (step {final['step']}): "
      f"**{final.get('val_loss', float('nan')):.3f} nats/token** vs the unigram baseline "
      f"**{sweep['unigram_loss']:.3f}**; median training speed "
      f"{sorted(speeds)[len(speeds) // 2]:.0f} tokens/s.",
      "",
      "| context length | × train length | loss (nats/token) | bits/byte |",
      "|---:|---:|---:|---:|",
  ]
  for length, loss, bpb in zip(sweep["lengths"], sweep["loss"], sweep["bits_per_byte"]):
    lines.append(f"| {length} | {length / sweep['train_length']:g} | {loss:.3f} | {bpb:.3f} |")
  lines.append("")
  lines.append(f"Loss over the first L tokens of the same {sweep['num_sequences']} validation "
               "documents at every length.")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _BENCHMARKS.value:
    missing = [p for p in _BENCHMARKS.value if not os.path.isfile(p)]
    if missing:
      common.fail(f"--benchmarks: no such file {', '.join(missing)}")
    from longjax.benchmarks import summary  # pylint: disable=g-import-not-at-top
    print(summary.readme_markdown(_BENCHMARKS.value))
    return
  if not _WORKDIR.value:
    raise app.UsageError("give --workdir=RUN (or --benchmarks=FILE.json,...)")
  if not os.path.isdir(_WORKDIR.value):
    common.fail(f"--workdir={_WORKDIR.value} does not exist")
  suffix = f"-{_LABEL.value}" if _LABEL.value else ""
  needed = ["eval/compare.json"] if _COMPARE.value else [f"eval/perplexity{suffix}.json",
                                                         "metrics.jsonl"]
  for name in needed:
    if not os.path.isfile(os.path.join(_WORKDIR.value, name)):
      command = "evaluate --compare=..." if _COMPARE.value else "train (or evaluate)"
      common.fail(f"{_WORKDIR.value} has no {name}: run python -m experiments.{command} "
                  f"--workdir={_WORKDIR.value} first")
  if _COMPARE.value:
    print(compare_markdown(_WORKDIR.value))
  else:
    print(markdown(_WORKDIR.value, _LABEL.value))


if __name__ == "__main__":
  common.run(main)
