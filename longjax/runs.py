"""Loading a trained run (for evaluation, sampling and notebooks)."""

import dataclasses
import json
import os
from typing import Any

import jax

from longjax import configuration
from longjax import defaults
from longjax.data import corpus as corpus_lib
from longjax.eval import duo
from longjax.parallel import mesh as mesh_lib
from longjax.training import checkpoints, state as state_lib


@dataclasses.dataclass
class LoadedRun:
  config: Any
  graphdef: Any
  params: Any
  step: int
  corpus: corpus_lib.Corpus
  mesh: jax.sharding.Mesh


class SavedConfigError(ValueError):
  """A run's saved config is not a JSON object; str(error) is one line saying where and why."""


def saved_config(workdir: str):
  """The config a run was trained with (`workdir/config.json`), on top of today's defaults.

  Fields added to longjax after the run was saved take their defaults, so old runs stay
  loadable and evaluation-time overrides of new fields apply to them.

  Raises:
    FileNotFoundError: `workdir` has no config.json.
    SavedConfigError: config.json is not a JSON object (one line saying where).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a longjax run directory?")
  return config_from_saved(read_json_object(path))


def read_json_object(path: str) -> dict:
  """The JSON object in `path`; SavedConfigError (a ValueError) in one line when it is not
  one."""
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except json.JSONDecodeError as e:
    raise SavedConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column "
                           f"{e.colno})") from None
  except UnicodeDecodeError:
    raise SavedConfigError(f"{path} is not valid JSON (not UTF-8 text)") from None
  if not isinstance(saved, dict):
    raise SavedConfigError(f"{path} is not a JSON object (it holds a {type(saved).__name__})")
  return saved


def config_from_saved(saved: dict):
  """A saved config's fields on top of today's defaults, lengths resolved."""
  config = defaults.default_config()
  _merge(config, saved)
  configuration.resolve_lengths(config)
  return config


def _merge(config, saved: dict) -> None:
  with config.unlocked():
    for key, value in saved.items():
      if isinstance(value, dict) and key in config:
        _merge(config[key], value)
      else:
        config[key] = value


def load_run(workdir: str, config=None, *, step: int | None = None) -> LoadedRun:
  """Restores a run's parameters onto a mesh built from `config` (default: the saved one).

  `config` may differ from the training config in anything that does not change parameter
  shapes: attention implementation, positional-encoding settings applied at evaluation time,
  evaluation lengths, mesh.

  Raises:
    FileNotFoundError: no config.json (when `config` is None) or no checkpoint.
    SavedConfigError: config.json cannot be read; with a `config` too, since it is what the
      parameter shapes are checked against.
    CheckpointError: see `checkpoints.restore_params`; also for other parameter shapes.
  """
  # Read first, before the corpus loads (which may write into `workdir`).
  has_saved = os.path.exists(os.path.join(workdir, "config.json"))
  saved = saved_config(workdir) if config is None or has_saved else None
  config = config if config is not None else saved
  configuration.validate_model(config.model)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(checkpoint_dir):  # before anything could be written into `workdir`
    raise FileNotFoundError(f"no checkpoint in {checkpoint_dir}: is {workdir!r} a trained run?")
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.parse_rules(config.mesh.rules)
  corpus = corpus_lib.load_corpus(config, workdir)
  graphdef, abstract = state_lib.model_graphdef(config.model, corpus.tokenizer.vocab_size)
  if saved is not None:  # else nothing to compare with; the restore itself checks
    _check_parameter_shapes(workdir, saved, config, abstract, corpus.tokenizer.vocab_size)
  shardings = mesh_lib.state_shardings(abstract, mesh, rules)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract.to_pure_dict(), shardings)
  step, params = checkpoints.restore_params(checkpoint_dir, target, step=step)
  calibrated = duo.calibrate(config, params, corpus, workdir)
  if calibrated is not config:  # DuoAttention without a head split: chosen now, for this run
    config = calibrated
    graphdef, _ = state_lib.model_graphdef(config.model, corpus.tokenizer.vocab_size)
  return LoadedRun(config=config, graphdef=graphdef, params=params, step=step, corpus=corpus,
                   mesh=mesh)


def _check_parameter_shapes(workdir: str, saved, config, abstract, vocab_size: int) -> None:
  """Refuses, in one line, a config whose parameters differ from the saved run's in shape."""
  _, saved_abstract = state_lib.model_graphdef(saved.model, vocab_size)
  shapes = lambda state: jax.tree.map(lambda a: a.shape, state.to_pure_dict())
  if shapes(abstract) == shapes(saved_abstract):
    return
  from longjax.training import resume  # pylint: disable=g-import-not-at-top
  changed = resume.differences(saved.model.to_dict(), config.model.to_dict())
  listed = "; ".join(f"model.{f}={a!r} in the run, {b!r} now" for f, a, b in changed)
  raise checkpoints.CheckpointMismatchError(
      f"this config gives the model of {workdir} other parameter shapes ({listed}); an "
      "evaluation-time override may change only what keeps them (e.g. model.posenc.scaling, "
      "model.attention.impl, eval.*)")


def describe(result: dict) -> str:
  """A short table of one evaluation task's result (`longjax.eval.harness`), for terminals."""
  if "depths" in result:  # a retrieval grid: rows are lengths, columns depths
    lines = [f"{result['task']} accuracy ({result['num_examples']} per cell)",
             f"{'length':>8} " + " ".join(f"{'d=' + format(d, 'g'):>7}" for d in result["depths"])]
    for length, row in zip(result["lengths"], result["accuracy"]):
      lines.append(f"{length:>8} " + " ".join(f"{a:>7.2f}" for a in row))
    return "\n".join(lines)
  if "sizes" in result:
    train = set(result.get("train_sizes", ()))
    lines = [f"{result['task']}: exact-match accuracy ({result['num_examples']} per size; "
             f"* = a training size)", f"{result['size_unit']:>16} {'accuracy':>9} {'tokens':>7}"]
    for size, acc, tok in zip(result["sizes"], result["accuracy"], result["token_accuracy"]):
      lines.append(f"{str(size) + ('*' if size in train else ''):>16} {acc:>9.3f} {tok:>7.3f}")
    return "\n".join(lines)
  lines = [f"{'length':>8} {'loss':>8} {'bits/byte':>10}"]
  for length, loss, bpb in zip(result["lengths"], result["loss"], result["bits_per_byte"]):
    lines.append(f"{length:>8} {loss:>8.4f} {bpb:>10.4f}")
  if "unigram_loss" in result:
    lines.append(f"unigram baseline loss {result['unigram_loss']:.4f}")
  return "\n".join(lines) + "\n" + json.dumps({"train_length": result.get("train_length")})
