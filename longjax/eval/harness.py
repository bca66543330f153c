"""The evaluation harness: named tasks run on a trained model, results to `eval/*.json`.

A task is a function `EvalContext -> dict` registered in `EVAL_TASKS`: `perplexity` (text runs),
`accuracy` (a synthetic-task run's exact-match accuracy against `task.test_sizes`), and the
retrieval grids `passkey` and `needle` (accuracy on `eval.lengths` x `task.depths`, on any run).
`config.eval.tasks` picks them; empty means the run's own (`run_tasks`). Each task's result is
written to `eval/<task>.json` (or `eval/<task>-<label>.json` when a label names a variant, e.g. a
training-free extension method applied at evaluation time) and its plots to `plots/`.
"""

from collections.abc import Callable
import dataclasses
import json
import os
from typing import Any

from absl import logging

from longjax import configuration
from longjax.data import tasks as tasks_lib
from longjax.eval import perplexity, plots, task_accuracy
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


def accuracy_task(ctx: EvalContext) -> dict:
  """A synthetic-task run's exact-match accuracy against `task.test_sizes`."""
  task = ctx.config.task
  spec = tasks_lib.get(task.name) if task.name else None
  if spec is None or spec.has_depth:
    raise configuration.ConfigError(
        "eval.tasks", "accuracy", "needs a run trained on a task without depth (task.name="
        f"{task.name!r})", ["perplexity", "passkey", "needle"])
  result = task_accuracy.size_sweep(
      ctx.graphdef, ctx.params, spec=spec, task_cfg=task[spec.name],
      sizes=tasks_lib.parse_sizes("task.test_sizes", task.test_sizes),
      count=ctx.config.eval.num_sequences, seed=task.seed, batch_size=ctx.config.eval.batch_size,
      progress=ctx.progress)
  result["train_sizes"] = tasks_lib.parse_sizes("task.train_sizes", task.train_sizes)
  return result


def _plot_accuracy(ctx: EvalContext, result: dict) -> list[str]:
  suffix = f"-{ctx.label}" if ctx.label else ""
  return [plots.accuracy_vs_size({ctx.label or "model": result}, max(result["train_sizes"]),
                                 os.path.join(ctx.workdir, "plots",
                                              f"{result['task']}_accuracy{suffix}.png"))]


def _grid_task(name: str):
  def run(ctx: EvalContext) -> dict:
    spec = tasks_lib.get(name)
    config = ctx.config
    result = task_accuracy.depth_grid(
        ctx.graphdef, ctx.params, spec=spec, task_cfg=config.task[name],
        lengths=configuration.parse_eval_lengths(config.eval.lengths, config.data.seq_len),
        depths=tasks_lib.parse_depths(config.task.depths), count=config.eval.num_sequences,
        seed=config.task.seed, batch_size=config.eval.batch_size,
        tokenizer=ctx.corpus.tokenizer, progress=ctx.progress)
    # An example of n tokens is n - 1 inputs: a training row of seq_len inputs holds n =
    # seq_len + 1 (the grid's lengths count an example's tokens).
    result["train_length"] = config.data.seq_len + 1
    return result

  def plot(ctx: EvalContext, result: dict) -> list[str]:
    suffix = f"-{ctx.label}" if ctx.label else ""
    return [plots.accuracy_heatmap(
        result, os.path.join(ctx.workdir, "plots", f"{name}_grid{suffix}.png"),
        train_length=result["train_length"],
        title=f"{name} accuracy{f' ({ctx.label})' if ctx.label else ''}")]

  return run, plot


# task name -> (run, plot)
EVAL_TASKS: dict[str, tuple[Callable[[EvalContext], dict],
                            Callable[[EvalContext, dict], list[str]]]] = {
    "perplexity": (perplexity_task, _plot_perplexity),
    "accuracy": (accuracy_task, _plot_accuracy),
    "passkey": _grid_task("passkey"),
    "needle": _grid_task("needle"),
}


def run_tasks(config) -> tuple[str, ...]:
  """`eval.tasks`, or by default the run's own: its task's grid or accuracy, else perplexity."""
  if config.eval.tasks:
    names = tuple(t.strip() for t in config.eval.tasks.split(",") if t.strip())
    for name in names:
      if name not in EVAL_TASKS:
        raise configuration.ConfigError("eval.tasks", name, "unknown task", sorted(EVAL_TASKS))
    return names
  name = config.task.name
  if not name:
    return ("perplexity",)
  return (name,) if name in EVAL_TASKS else ("accuracy",)


def evaluate(ctx: EvalContext, tasks: tuple[str, ...] | None = None) -> dict[str, dict]:
  """Runs `tasks` (default `run_tasks(ctx.config)`), writes their JSON and plots, and returns
  {task: result}."""
  tasks = run_tasks(ctx.config) if tasks is None else tasks
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


def has_results(workdir: str, tasks: tuple[str, ...]) -> bool:
  """Whether `workdir/eval/` holds every task's (unlabelled) result."""
  return all(os.path.exists(os.path.join(workdir, "eval", f"{t}.json")) for t in tasks)


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)  # atomic: an interrupted evaluation never leaves half a file
