"""What a resumed run may change, and the check that refuses every other change.

A run directory's checkpoints were trained with one config. Rerunning `experiments.train` on it
with a different one must not mix two experiments into one run (or, for a change of parameter
shapes, fail the restore and throw the checkpoints away), so before anything is written the
saved config is compared with the new one field by field. Only the fields below may differ:
they change how the run is carried out, logged, evaluated or laid out on devices, not the model,
the data stream or the optimizer's settings. Two change numbers all the same: `train.steps` is
the length of the cosine learning-rate schedule, so the steps after the resume point get the
new schedule's rates; and another attention implementation, mesh or remat policy rounds
differently. docs/reliability.md lists these fields (a test keeps the two equal).
"""

import json
import os

# Dotted field names, or a section name for every field below it.
RESUMABLE_FIELDS = (
    "train.steps",             # train further (or stop earlier); sets the schedule's length
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_every",
    "train.eval_batches",
    "eval",                    # evaluation lengths, documents and batch size
    "task.test_sizes",         # what the accuracy sweep and the retrieval grids evaluate
    "task.depths",
    "mesh",                    # checkpoints restore onto any mesh
    "model.attention.impl",    # the same maths on another implementation
    "model.attention.block_size",
    "model.remat",             # what the backward pass recomputes
    "model.scan_layers",       # the same stacked parameters, looped instead of scanned
    "data.tfds_dir",           # where the dataset's build is cached
)


class ResumeError(ValueError):
  """The new config changes fields a resumed run may not change; one line, no traceback."""


def resumable(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in RESUMABLE_FIELDS)


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = value
  return flat


def differences(saved: dict, new: dict) -> list[tuple[str, object, object]]:
  """[(field, saved value, new value)] for every leaf that differs, sorted by field.

  Values are compared after a JSON round trip (a tuple and the list it was saved as are equal);
  a field missing on one side shows as None there.
  """
  a = _flatten(json.loads(json.dumps(saved)))
  b = _flatten(json.loads(json.dumps(new)))
  return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def check(workdir: str, saved, config) -> list[str]:
  """Refuses a resume whose config differs from the saved one outside RESUMABLE_FIELDS.

  Args:
    workdir: the run directory (for the message).
    saved: the config the run was trained with (`longjax.runs.saved_config`).
    config: the new config, resolved (`configuration.resolve_lengths`).

  Returns:
    'field: old -> new' for each resumable field that changed, to be reported.

  Raises:
    ResumeError: listing every field that may not change, with both values.
  """
  changed = differences(saved.to_dict(), config.to_dict())
  refused = [(f, a, b) for f, a, b in changed if not resumable(f)]
  if refused:
    listed = "; ".join(f"{f}={a!r} in the run, {b!r} now" for f, a, b in refused)
    raise ResumeError(
        f"{workdir} holds checkpoints of a run with another config ({listed}); resuming may "
        "change only " + ", ".join(RESUMABLE_FIELDS) + ". Train the new config in a new "
        "--workdir, or rerun with the run's own values to resume it")
  return [f"{f}: {a!r} -> {b!r}" for f, a, b in changed]


def has_checkpoints(workdir: str) -> bool:
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def _saved_config(workdir: str):
  """The config the run's checkpoints were trained with: the newest step's copy, else
  config.json (both are written by every start of the run)."""
  from longjax import runs  # pylint: disable=g-import-not-at-top (runs imports training)
  directory = os.path.join(workdir, "checkpoints")
  for step in sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True):
    try:
      return runs.config_from_saved(
          runs.read_json_object(os.path.join(directory, str(step), "config", "metadata")))
    except (OSError, ValueError):
      continue  # that step is unfinished or damaged; its restore will say so
  try:
    return runs.saved_config(workdir)
  except (OSError, ValueError) as e:
    raise ResumeError(f"{workdir} holds checkpoints but no readable config to check this one "
                      f"against ({e}); train in a new --workdir") from None


def _check_writable(workdir: str) -> None:
  """Raises ResumeError when `workdir` is empty, a file, under a file, or cannot be written."""
  if not workdir:
    raise ResumeError("--workdir is empty: name the run directory")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ResumeError(f"--workdir={workdir} is a file, not a directory")
  existing = workdir
  while not os.path.exists(existing):
    existing = os.path.dirname(os.path.abspath(existing))
  if not os.path.isdir(existing):
    raise ResumeError(f"--workdir={workdir} cannot be created: {existing} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ResumeError(f"--workdir={workdir} cannot be written: no write permission on "
                      f"{existing}")


def check_workdir(workdir: str, config) -> list[str]:
  """Checks that `workdir` can hold a run of `config` (writing nothing; loading the corpus
  creates it).

  Returns:
    The resumable changes (`check`) when it already holds checkpoints, else [].

  Raises:
    ResumeError: before anything is written, in one line.
  """
  _check_writable(workdir)
  return check(workdir, _saved_config(workdir), config) if has_checkpoints(workdir) else []
