"""Orbax checkpoints of the train state, the data iterator and the config, with checksums.

One orbax step directory holds three items: `state` (params, optimizer state, step; sharded
arrays, restored straight onto the mesh), `data` (the grain iterator's position, one JSON file
per process) and `config` (JSON). Nothing is pickled. When a save's files are complete (in
orbax's background thread, before it renames the step folder into place), the SHA-256 of each
(but orbax's `_CHECKPOINT_METADATA`) goes into `<step>/checksums.json`, so the checksums commit
with the step; a restore first verifies them: bit rot is caught even where the data decodes.

Restoring tries the newest checkpoint first. One that is corrupt (truncated by a crash or a full
disk, failing its checksums, failing to decode) is skipped and the previous one tried; once one
restores, the corrupt newer ones are moved to `checkpoints_corrupt/` (never over an earlier
move: nothing there is deleted or overwritten), since training will save those steps again.
Three failures are not corruption and stop the run instead, moving nothing: every checkpoint
failing (`NoRestorableCheckpointError`), a checkpoint of other parameter shapes
(`CheckpointMismatchError`), and one that cannot be read for permissions.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import threading

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp

CHECKSUMS = "checksums.json"
# Orbax rewrites this top-level file at commit (it adds the commit time), after the point where
# the checksums are taken; a damaged copy fails orbax's own JSON read, which counts as corrupt.
_UNSUMMED = (CHECKSUMS, "_CHECKPOINT_METADATA")
_ITEMS = ("state", "data", "config")
# Test hook: SIGKILL the process inside the asynchronous save of this step, in orbax's
# background thread once the step's files are written, before its checksums and its commit.
_SIGKILL_IN_SAVE_ENV = "LONGJAX_TEST_SIGKILL_IN_SAVE"
# How orbax words a restore target that does not fit the saved tree (checked by a test).
_MISMATCH_MARKERS = ("stored shape", "tree structures do not match", "not compatible")


class CheckpointError(RuntimeError):
  """A restore problem that is not corruption: str(error) is one line saying what to do."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint holds other parameter shapes or structure than the model being restored."""


class NoRestorableCheckpointError(CheckpointError):
  """Every checkpoint of the run failed to restore; none was moved."""


class CorruptCheckpointError(RuntimeError):
  """A checkpoint's files fail their checksums."""


def _file_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def _step_files(step_dir: str) -> list[str]:
  """Paths of every file under `step_dir` relative to it, sorted, but for `_UNSUMMED`."""
  files = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel not in _UNSUMMED:
        files.append(rel)
  return sorted(files)


def write_checksums(step_dir: str) -> None:
  """Writes `step_dir/checksums.json` (atomically: a partial file never has the final name)."""
  sums = {rel: _file_digest(os.path.join(step_dir, rel)) for rel in _step_files(step_dir)}
  tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(sums, f, indent=0, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def _exists(path: str) -> bool:
  """`os.path.exists`, but a permission error is raised rather than read as "missing" (it
  would make a step in an unreadable folder look unchecksummed, and then corrupt)."""
  try:
    os.stat(path)
  except (FileNotFoundError, NotADirectoryError):
    return False
  return True


def _permission_denied(error: BaseException) -> str | None:
  """The path of a permission error anywhere in `error`'s chain ("" if it names none), or
  None when there is none.

  Python raises PermissionError (an OSError with errno EACCES or EPERM); tensorstore, which
  reads the arrays, raises ValueError('PERMISSION_DENIED: ... Failed to open: "<path>" ...').
  """
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, PermissionError) or (
        isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM)):
      return str(error.filename or "")
    if "PERMISSION_DENIED" in str(error):
      path = re.search(r'Failed to open: "([^"]+)"', str(error))
      return path.group(1) if path else ""
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
  return None


def _unreadable(path: str) -> CheckpointError:
  return CheckpointError(f"cannot read {path} (permission denied): fix the permissions of it "
                         "or of a folder above it and rerun. Nothing was moved")


def verify_checksums(step_dir: str) -> bool:
  """Checks every file listed in `step_dir/checksums.json`.

  Returns:
    True when verified, False when the step has no checksum file (saved by a longjax without
    them, or killed between orbax's commit and the checksum write).

  Raises:
    CorruptCheckpointError: naming the first missing or changed file.
    CheckpointError: a file cannot be read for permissions.
  """
  path = os.path.join(step_dir, CHECKSUMS)
  try:
    if not _exists(path):
      return False
    try:
      with open(path, encoding="utf-8") as f:
        sums = json.load(f)
    except ValueError:
      raise CorruptCheckpointError(f"{CHECKSUMS} is not valid JSON") from None
    for rel, expected in sorted(sums.items()):
      file = os.path.join(step_dir, rel)
      if not _exists(file):
        raise CorruptCheckpointError(f"{rel} is missing")
      if _file_digest(file) != expected:
        raise CorruptCheckpointError(f"{rel} does not match its checksum")
  except PermissionError as e:
    raise _unreadable(e.filename or step_dir) from None
  return True


def _is_mismatch(error: Exception) -> bool:
  return isinstance(error, ValueError) and any(m in str(error) for m in _MISMATCH_MARKERS)


def _one_line(error: Exception) -> str:
  text = str(error).strip()
  return f"{type(error).__name__}: {text.splitlines()[0][:200]}" if text else type(error).__name__


class Checkpointer:
  """Saves and restores runs in `directory`; keeps the last `keep` steps."""

  def __init__(self, directory: str, *, keep: int):
    self.directory = os.path.abspath(directory)
    # Steps whose save was started but not yet checksummed (process 0 only). A step is added
    # before `manager.save`, which first waits for the previous save to finish: the previous
    # save's callback then sees it here without a folder yet and must leave it for its own.
    self._pending = []
    self._lock = threading.Lock()
    self._kill_in_save = int(os.environ.get(_SIGKILL_IN_SAVE_ENV, "0"))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._checksum_pending)),
        item_names=_ITEMS)

  def _checksum_pending(self) -> None:
    """Runs in orbax's background thread once a save's files are complete. Orbax calls it
    before renaming the temporary step folder to its final name, so the checksums then commit
    with the step; a final folder is checksummed too, in case a later orbax calls it after.

    Orbax runs one save at a time, so the pending steps with a folder are the one finishing
    (and, at most, ones a later orbax already renamed); a pending step without a folder is a
    save still waiting for this one to end, and stays pending for its own callback.
    """
    with self._lock:
      for step in list(self._pending):
        for name in (f"{step}.orbax-checkpoint-tmp", str(step)):
          step_dir = os.path.join(self.directory, name)
          if os.path.isdir(step_dir):
            if step == self._kill_in_save:
              os.kill(os.getpid(), signal.SIGKILL)
            write_checksums(step_dir)
            self._pending.remove(step)
            break

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator, config_dict: dict) -> None:
    """Starts an asynchronous save; arrays are copied before this returns, so training may
    go on (and donate `state`) at once. The iterator's position is read synchronously."""
    primary = jax.process_index() == 0  # only process 0 writes checksums
    if primary:
      with self._lock:
        self._pending.append(step)
    saved = False
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          config=ocp.args.JsonSave(config_dict)))
    finally:
      if primary and not saved:  # orbax skipped the step or failed: no callback will come
        with self._lock:
          if step in self._pending:
            self._pending.remove(step)

  def restore_latest(self, target_state, data_iterator, *, report=logging.warning):
    """Restores the newest restorable checkpoint into the shardings of `target_state`.

    Args:
      target_state: a train state (arrays or ShapeDtypeStructs with shardings) giving the
        structure, dtypes and shardings to restore into.
      data_iterator: the grain iterator; its position is set in place.
      report: called with a one-line message for each corrupt checkpoint skipped or without
        checksums.

    Returns:
      The restored state, or None when the run has no checkpoint.

    Raises:
      CheckpointMismatchError, NoRestorableCheckpointError, CheckpointError: see the module
        docstring; nothing was moved.
    """
    failed = []
    for step in reversed(self.all_steps()):
      try:
        restored = self._restore_step(step, ocp.args.Composite(
            state=ocp.args.StandardRestore(target_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)), report=report)
      except CheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except (anything else: unusable)
        unreadable = _permission_denied(e)
        if unreadable is not None:  # the files may be fine: never quarantined
          raise _unreadable(unreadable or os.path.join(self.directory, str(step))) from None
        if _is_mismatch(e):
          raise CheckpointMismatchError(
              f"checkpoint step {step} in {self.directory} does not fit this model "
              f"({_one_line(e)}); it was trained with other parameter shapes. Nothing was "
              "moved: restore it with the config it was trained with") from None
        failed.append((step, _one_line(e)))
        continue
      for bad, reason in failed:
        report(f"checkpoint step {bad} could not be restored ({reason}); moved to "
               f"{self._quarantine(bad)}; restored step {step} instead")
      return restored["state"]
    if failed:
      listed = "; ".join(f"step {s}: {r}" for s, r in failed)
      raise NoRestorableCheckpointError(
          f"no checkpoint in {self.directory} can be restored ({listed}). Nothing was moved. "
          "To train from step 0, move that folder aside (or use a new --workdir) and rerun")
    return None

  def _restore_step(self, step: int, args, *, report):
    step_dir = os.path.join(self.directory, str(step))
    if not verify_checksums(step_dir):
      report(f"checkpoint step {step} has no {CHECKSUMS} (saved before checksums, or the "
             "run stopped right after the save): restoring it unverified")
    return self._manager.restore(step, args=args)

  def _quarantine(self, step: int) -> str:
    """Moves a step to `checkpoints_corrupt/<step>` (or `<step>.1`, `.2`, ... if taken)."""
    corrupt_dir = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt")
    os.makedirs(corrupt_dir, exist_ok=True)
    target, n = os.path.join(corrupt_dir, str(step)), 0
    while os.path.exists(target):
      n += 1
      target = os.path.join(corrupt_dir, f"{step}.{n}")
    shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until pending saves are on disk (and checksummed)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(directory: str, target_params, step: int | None = None, *,
                   report=logging.warning):
  """Restores only the parameters of a run (for evaluation and sampling), checksums verified.

  Args:
    directory: the run's `checkpoints/` folder.
    target_params: the parameter pytree (arrays or ShapeDtypeStructs with shardings).
    step: which step; None = the latest.
    report: called with a one-line message when the step has no checksums.

  Returns:
    (step, params).

  Raises:
    FileNotFoundError: no checkpoint (or not that step).
    CheckpointError: the step fails its checksums, is unreadable, or does not fit the model.
  """
  directory = os.path.abspath(directory)  # orbax's storage layer needs absolute paths
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint in {directory}")
  with ocp.CheckpointManager(directory, item_names=_ITEMS,
                             options=ocp.CheckpointManagerOptions(create=False)) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    if step not in manager.all_steps():
      raise FileNotFoundError(f"no checkpoint of step {step} in {directory} (it has "
                              f"{', '.join(map(str, sorted(manager.all_steps())))})")
    step_dir = os.path.join(directory, str(step))
    try:
      if not verify_checksums(step_dir):
        report(f"checkpoint step {step} has no {CHECKSUMS}: restoring it unverified")
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(
              {"params": target_params},
              restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target_params}),
              partial_restore=True)))
    except CorruptCheckpointError as e:
      raise CheckpointError(f"checkpoint step {step} in {directory} is corrupt ({e}); pass "
                            "--step= an earlier one") from None
    except CheckpointError:
      raise
    except Exception as e:  # pylint: disable=broad-except (re-raised unless a permission error)
      unreadable = _permission_denied(e)
      if unreadable is not None:
        raise _unreadable(unreadable or step_dir) from None
      if _is_mismatch(e):
        raise CheckpointError(f"checkpoint step {step} in {directory} does not fit the model "
                              f"of this config ({_one_line(e)}); an override changed parameter "
                              "shapes") from None
      raise
  return step, restored["state"]["params"]
