"""The evaluation harness: named tasks run on a trained model, results to `eval/*.json`.

A task is a function `EvalContext -> dict` registered in `EVAL_TASKS`; later issues add
retrieval tasks (passkey, needle-in-a-haystack, MQAR) the same way. Each task's result is written
to `eval/<task>.json` (or `eval/<task>-<label>.json` when a label names a variant, e.g. a
training-free extension method applied at evaluation time) and its plots to `plots/`.
"""

from collections.abc import Callable
import dataclasses
import json
import os
from typing import Any

from absl import logging

from longjax import configuration
from longjax.eval import perplexity, plots
from longjax.training import metrics as metrics_lib


@dataclasses.dataclass
class EvalContext:
  config: Any          # the full run config (with any evaluation-time overrides applied)
  graphdef: Any        # the model's static structure
  params: Any          # its parameters
  corpus: Any          # longjax.data.corpus.Corpus: tokenizer, train and validation sources
  workdir: str
  label: str = ""      # names a variant of the model in file names and plot legends
  progress: bool = True


def perplexity_task(ctx: EvalContext) -> dict:
  """Loss / bits per byte vs context length and vs position (see `longjax.eval.perplexity`)."""
  seq_len = ctx.config.data.seq_len
  lengths = configuration.parse_eval_lengths(ctx.config.eval.lengths, seq_len)
  sequences, lengths, skipped = perplexity.fillable_sweep(
      ctx.corpus.validation, ctx.corpus.tokenizer, lengths=lengths,
      count=ctx.config.eval.num_sequences)
  for entry in skipped:
    logging.warning("eval length %d skipped: %s", entry["length"], entry["reason"])
  result = perplexity.length_sweep(ctx.graphdef, ctx.params, sequences=sequences,
                                   lengths=lengths, batch_size=ctx.config.eval.batch_size,
                                   tokenizer=ctx.corpus.tokenizer, progress=ctx.progress)
  result["skipped_lengths"] = skipped
  result["train_length"] = seq_len
  result["unigram_loss"] = _unigram(ctx)
  return result


def _unigram(ctx: EvalContext) -> float:
  path = os.path.join(ctx.workdir, "eval", "unigram.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      return json.load(f)["loss"]
  loss = perplexity.unigram_baseline(ctx.corpus.train, ctx.corpus.validation,
                                     ctx.corpus.tokenizer)
  write_json(path, {"loss": loss, "what": "validation cross-entropy (nats/token) under "
                                           "add-one-smoothed training unigram frequencies"})
  return loss


def _plot_perplexity(ctx: EvalContext, result: dict) -> list[str]:
  name = ctx.label or "model"
  suffix = f"-{ctx.label}" if ctx.label else ""
  plot_dir = os.path.join(ctx.workdir, "plots")
  return [
      plots.loss_vs_length({name: result}, result["train_length"],
                           os.path.join(plot_dir, f"loss_vs_length{suffix}.png"),
                           baseline=result["unigram_loss"]),
      plots.loss_vs_position({name: result}, result["train_length"],
                             os.path.join(plot_dir, f"loss_vs_position{suffix}.png")),
  ]


# task name -> (run, plot)
EVAL_TASKS: dict[str, tuple[Callable[[EvalContext], dict],
                            Callable[[EvalContext, dict], list[str]]]] = {
    "perplexity": (perplexity_task, _plot_perplexity),
}


def evaluate(ctx: EvalContext, tasks: tuple[str, ...] = ("perplexity",)) -> dict[str, dict]:
  """Runs `tasks`, writes their JSON and plots, and returns {task: result}."""
  results = {}
  for task in tasks:
    if task not in EVAL_TASKS:
      raise configuration.ConfigError("eval.tasks", task, "unknown task", sorted(EVAL_TASKS))
    run, plot = EVAL_TASKS[task]
    result = run(ctx)
    suffix = f"-{ctx.label}" if ctx.label else ""
    write_json(os.path.join(ctx.workdir, "eval", f"{task}{suffix}.json"), result)
    result["plots"] = plot(ctx, result)
    results[task] = result
  history = metrics_lib.read_metrics(ctx.workdir)
  if history:
    plots.training_curve(history, os.path.join(ctx.workdir, "plots", "training_curve.png"),
                         baseline=results.get("perplexity", {}).get("unigram_loss"))
  return results


def has_results(workdir: str, tasks: tuple[str, ...] = ("perplexity",)) -> bool:
  """Whether `workdir/eval/` holds every task's (unlabelled) result."""
  return all(os.path.exists(os.path.join(workdir, "eval", f"{t}.json")) for t in tasks)


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)  # atomic: an interrupted evaluation never leaves half a file
