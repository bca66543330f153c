"""Synthetic tasks (`TASKS`): generators with brute-force checkers, and their config section.

`config.task.name` picks one for training (`experiments.train` then reads its TFDS dataset,
`longjax.data.builders.synthetic_task`) and the evaluation harness sweeps `task.test_sizes`.
Each task has its own section `config.task.<name>` declared by its module.
"""

import ml_collections

from longjax.data.tasks import algorithmic, recall, retrieval
from longjax.data.tasks.base import Example, SizeError, TaskSpec, example_rng, parse_sizes, sized
from longjax.errors import ConfigError

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    algorithmic.COPY, algorithmic.REVERSE, algorithmic.SORT, algorithmic.ADDITION,
    algorithmic.PARITY, recall.MQAR, recall.INDUCTION_HEADS, recall.SELECTIVE_COPYING,
    retrieval.PASSKEY, retrieval.NEEDLE)}


def default_task_config() -> ml_collections.ConfigDict:
  """`config.task`: which task a run trains on (none: the text corpus) and how it is sized."""
  c = ml_collections.ConfigDict()
  c.name = ""                 # "" = train on config.data's text; else one of TASKS
  c.train_sizes = "1-20"      # sizes drawn uniformly for training ('A-B', 'a,b,c' or a mix)
  c.test_sizes = "1-40"       # sizes the accuracy sweep evaluates (past train_sizes: extrapolation)
  c.depths = "0,0.25,0.5,0.75,1"  # needle depths of the retrieval grids (passkey, needle)
  c.num_train = 20_000        # examples written for training (then repeated, reshuffled)
  c.num_validation = 512
  c.seed = 0                  # the examples' seed (the data order's is data.seed)
  for spec in TASKS.values():
    c[spec.name] = spec.defaults()
  return c


def get(name: str) -> TaskSpec:
  if name not in TASKS:
    raise ConfigError("task.name", name, "unknown task", sorted(TASKS))
  return TASKS[name]


def require_byte_tokenizer(config) -> None:
  """Task runs render byte tokens: `data.tokenizer` must be `byte` (checked by the config's
  validation and again where a corpus is loaded for evaluation, which skips it)."""
  if config.task.name and config.data.tokenizer != "byte":
    raise ConfigError("data.tokenizer", config.data.tokenizer,
                      f"task.name={config.task.name!r} renders byte tokens", ["byte"])


def parse_depths(spec: str) -> list[float]:
  depths = []
  for item in filter(None, (s.strip() for s in str(spec).split(","))):
    try:
      depths.append(float(item))
    except ValueError:
      raise ConfigError("task.depths", spec, f"cannot parse {item!r}", ["numbers in [0, 1]"]
                        ) from None
  if not depths or not all(0.0 <= d <= 1.0 for d in depths):
    raise ConfigError("task.depths", spec, "need one or more numbers in [0, 1]")
  return sorted(set(depths))


__all__ = ["TASKS", "Example", "SizeError", "TaskSpec", "default_task_config", "example_rng",
           "get", "parse_depths", "parse_sizes", "require_byte_tokenizer", "sized"]
