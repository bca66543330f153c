"""Orbax checkpoints of the train state, the data iterator and the config.

One orbax step directory holds three items: `state` (params, optimizer state, step; sharded
arrays, restored straight onto the mesh), `data` (the grain iterator's position, one JSON file
per process) and `config` (JSON). Nothing is pickled.

A latest checkpoint that cannot be restored (truncated by a crash, a full disk, bit rot) is
reported, moved to `checkpoints_corrupt/`, and the previous one is used.
"""

import os
import shutil

from absl import logging
import grain
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores runs in `directory`; keeps the last `keep` steps."""

  def __init__(self, directory: str, *, keep: int):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True),
        item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator, config_dict: dict) -> None:
    """Starts an asynchronous save; arrays are copied before this returns, so training may
    go on (and donate `state`) at once. The iterator's position is read synchronously."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config_dict)))

  def restore_latest(self, target_state, data_iterator, *, report=logging.warning):
    """Restores the newest restorable checkpoint into the shardings of `target_state`.

    Args:
      target_state: a train state (arrays or ShapeDtypeStructs with shardings) giving the
        structure, dtypes and shardings to restore into.
      data_iterator: the grain iterator; its position is set in place.
      report: called with a one-line message for each unusable checkpoint.

    Returns:
      The restored state, or None when there is no usable checkpoint.
    """
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored["state"]
      except Exception as e:  # pylint: disable=broad-except (any failure means unusable)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        moved = self._quarantine(step)
        report(f"checkpoint step {step} could not be restored ({type(e).__name__}: "
               f"{reason[:200]}); moved to {moved}, trying the previous one")
    return None

  def _quarantine(self, step: int) -> str:
    corrupt_dir = os.path.join(os.path.dirname(self.directory), "checkpoints_corrupt")
    os.makedirs(corrupt_dir, exist_ok=True)
    target = os.path.join(corrupt_dir, str(step))
    if os.path.exists(target):
      shutil.rmtree(target)
    shutil.move(os.path.join(self.directory, str(step)), target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(directory: str, target_params, step: int | None = None):
  """Restores only the parameters of a run (for evaluation and sampling).

  Args:
    directory: the run's `checkpoints/` folder.
    target_params: the parameter pytree (arrays or ShapeDtypeStructs with shardings).
    step: which step; None = the latest.

  Returns:
    (step, params).
  """
  directory = os.path.abspath(directory)  # orbax's storage layer needs absolute paths
  with ocp.CheckpointManager(directory, item_names=("state", "data", "config")) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            {"params": target_params},
            restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target_params}),
            partial_restore=True)))
  return step, restored["state"]["params"]
