"""Task accuracy: exact-match answers against test size, and the retrieval grids (length x depth).

An example counts as right when the model's greedy prediction equals every scored token (the
answer and its EOS) given the prompt and the answer so far, i.e. when greedy decoding from the
prompt writes the answer exactly (`training.step.token_predictions`). Examples come from the
task's evaluation stream (`tasks.example_rng(task.seed, 2, size, depth index, i)`): the same
examples for every model and every evaluation-time method.
"""

import functools
import math

import jax
import numpy as np
from tqdm import auto as tqdm

from longjax.data import tasks as tasks_lib
from longjax.training import step as step_lib

_EVAL_STREAM = 2
_LENGTH_MULTIPLE = 16  # sweeps pad examples to this multiple: fewer shapes, fewer compilations


@functools.partial(jax.jit, static_argnums=0)
def _predictions(graphdef, params, tokens):
  return step_lib.token_predictions(graphdef, params, tokens)


def score(graphdef, params, examples: list, *, batch_size: int, pad_id: int = 0,
          length: int | None = None) -> tuple[np.ndarray, float]:
  """Exact match per example and the accuracy over all scored tokens.

  Args:
    graphdef, params: the model.
    examples: `tasks.Example`s.
    batch_size: sequences per forward pass (a short last batch is padded with copies, so that
      every batch has one shape).
    pad_id: fills the rows after each example (causal: never seen by its positions).
    length: the padded length; default the longest example rounded up to 16 tokens.

  Returns:
    (bool [N] exact match, fraction of scored tokens predicted right).
  """
  longest = max(len(e.tokens) for e in examples)
  length = length or _LENGTH_MULTIPLE * math.ceil(longest / _LENGTH_MULTIPLE)
  tokens = np.full((len(examples), length), pad_id, np.int32)
  scored = np.zeros((len(examples), length), bool)
  for row, e in enumerate(examples):
    tokens[row, :len(e.tokens)] = e.tokens
    scored[row, :len(e.tokens)] = e.scored
  predictions = []
  for start in range(0, len(examples), batch_size):
    batch = tokens[start:start + batch_size]
    short = batch_size - len(batch)
    if short:
      batch = np.concatenate([batch, np.repeat(batch[:1], short, axis=0)])
    predictions.append(np.asarray(_predictions(graphdef, params, batch))[:batch_size - short])
  predictions = np.concatenate(predictions)
  right = predictions == tokens[:, 1:]
  targets = scored[:, 1:]
  exact = (right | ~targets).all(axis=1)
  return exact, float((right & targets).sum() / max(targets.sum(), 1))


def size_sweep(graphdef, params, *, spec: tasks_lib.TaskSpec, task_cfg, sizes: list[int],
               count: int, seed: int, batch_size: int, progress: bool = True) -> dict:
  """Accuracy of `count` examples at each size.

  Returns:
    {"task", "size_unit", "sizes", "accuracy" (exact match), "token_accuracy",
     "num_examples"}.
  """
  result = {"task": spec.name, "size_unit": spec.size_unit, "sizes": [], "accuracy": [],
            "token_accuracy": [], "num_examples": count}
  for size in tqdm.tqdm(sizes, desc=f"{spec.name} sizes", disable=not progress, leave=False):
    examples = [tasks_lib.sized("task.test_sizes", lambda n: spec.generate(
        task_cfg, tasks_lib.example_rng(seed, _EVAL_STREAM, n, 0, i), n), size)
                for i in range(count)]
    exact, token_accuracy = score(graphdef, params, examples, batch_size=batch_size)
    result["sizes"].append(size)
    result["accuracy"].append(float(exact.mean()))
    result["token_accuracy"].append(token_accuracy)
  return result


def depth_grid(graphdef, params, *, spec: tasks_lib.TaskSpec, task_cfg, lengths: list[int],
               depths: list[float], count: int, seed: int, batch_size: int, tokenizer,
               progress: bool = True) -> dict:
  """Retrieval accuracy of `count` examples per (length, depth) cell.

  Returns:
    {"task", "lengths", "depths", "accuracy" [len(lengths)][len(depths)], "num_examples"}.
  """
  grid = np.zeros((len(lengths), len(depths)))
  bar = tqdm.tqdm(total=len(lengths) * len(depths), desc=f"{spec.name} grid",
                  disable=not progress, leave=False)
  for a, length in enumerate(lengths):
    for b, depth in enumerate(depths):
      examples = [tasks_lib.sized("eval.lengths", lambda n: spec.generate(
          task_cfg, tasks_lib.example_rng(seed, _EVAL_STREAM, n, b, i), n, tokenizer=tokenizer,
          depth=depth), length) for i in range(count)]
      exact, _ = score(graphdef, params, examples, batch_size=batch_size,
                       pad_id=tokenizer.pad_id, length=length)
      grid[a, b] = exact.mean()
      bar.update()
  bar.close()
  return {"task": spec.name, "lengths": list(lengths), "depths": list(depths),
          "accuracy": grid.tolist(), "num_examples": count}
