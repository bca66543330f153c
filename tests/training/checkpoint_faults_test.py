"""Fault injection on checkpoints: no good checkpoint is ever lost, no bad one silently used.

Each test damages a copy of one tiny run (`testing.trained_run()`, checkpoints at steps 3 and 6).
"""

import builtins
import contextlib
import errno
import functools
import os
from unittest import mock

from absl.testing import absltest
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from longjax import configuration
from longjax.data import corpus as corpus_lib
from longjax.data import pipeline
from longjax.parallel import mesh as mesh_lib
from longjax.training import checkpoints, state as state_lib
from tests import testing

_VOCAB = 259  # byte tokenizer: 256 bytes + specials
# What tensorstore raises for an array file it may not open (from a run without root's
# permission override), shortened.
_TENSORSTORE_DENIED = (
    'PERMISSION_DENIED: Error opening "cast" driver: Error opening "zarr" driver: Error reading '
    '"w/.zarray" in OCDBT database at local file "{state}/": Error reading Byte range [0, 245) '
    'of local file "{file}": Failed to open: "{file}": Permission denied [os_error_code=\'13\']')


def _config(**overrides):
  config = testing.tiny_config(**{**testing.TRAINED_RUN_OVERRIDES, **overrides})
  configuration.resolve_lengths(config)
  return config


@functools.cache
def _target_state(overrides: tuple):
  """A fresh train state of the run's config with `overrides`: the restore target."""
  config = _config(**dict(overrides))
  tx, _ = state_lib.make_model_optimizer(config.model, config.train, vocab_size=_VOCAB)
  _, state, _ = state_lib.create_train_state(
      config.model, tx, vocab_size=_VOCAB, mesh=mesh_lib.make_mesh(config.mesh),
      rules=mesh_lib.parse_rules(config.mesh.rules), seed=config.seed)
  return state


def _restore(workdir, **overrides):
  """(restored state or None, reports) of the trainer's restore with `overrides`."""
  config = _config(**overrides)
  corpus = corpus_lib.load_corpus(config, workdir)
  state = _target_state(tuple(sorted(overrides.items())))
  data_iter = pipeline.make_train_iterator(
      data_source=corpus.train, tokenizer=corpus.tokenizer, seq_len=config.data.seq_len,
      batch_size=config.train.batch_size, seed=config.data.seed)
  reports = []
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3)
  try:
    restored = ckpt.restore_latest(state, data_iter, report=reports.append)
  finally:
    ckpt.close()
  return restored, reports


@contextlib.contextmanager
def _unreadable_folder(folder):
  """Makes everything inside `folder` fail with EACCES, as a folder without read and search
  permission does for a user other than root (tests run as root, which reads anything)."""
  inside = os.path.abspath(folder) + os.sep

  def guard(real):
    def guarded(path, *args, **kwargs):
      if isinstance(path, (str, os.PathLike)) and os.path.abspath(path).startswith(inside):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
      return real(path, *args, **kwargs)
    return guarded

  with mock.patch.object(os, "stat", guard(os.stat)), \
       mock.patch.object(os, "scandir", guard(os.scandir)), \
       mock.patch.object(os, "listdir", guard(os.listdir)), \
       mock.patch.object(builtins, "open", guard(builtins.open)):
    yield


def _state_file(workdir, step):
  """The largest array data file of a checkpoint's state."""
  files = []
  for root, _, names in os.walk(os.path.join(workdir, "checkpoints", str(step), "state")):
    files += [os.path.join(root, n) for n in names if "/d/" in os.path.join(root, n)]
  return max(files, key=os.path.getsize)


# One worker trains the shared run (--dist=loadgroup in setup.cfg).
@pytest.mark.xdist_group(testing.TRAINED_RUN_GROUP)
class CheckpointFaultsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self._run = testing.trained_run()

  def _copy(self):
    return testing.copy_of_trained_run(self.create_tempdir().full_path)

  def _assert_fell_back_to_step_3(self, workdir, reason):
    restored, reports = _restore(workdir)
    self.assertEqual(int(restored.step), 3)
    self.assertLen(reports, 1)
    self.assertRegex(reports[0], rf"checkpoint step 6 could not be restored .*{reason}.*"
                     r"moved to .*checkpoints_corrupt/6; restored step 3 instead")
    self.assertEqual(os.listdir(os.path.join(workdir, "checkpoints_corrupt")), ["6"])
    self.assertEqual(testing.tree_bytes(os.path.join(workdir, "checkpoints", "3")),
                     testing.tree_bytes(os.path.join(self._run, "checkpoints", "3")))

  def test_checkpoints_carry_checksums_that_verify(self):
    for step in (3, 6):
      self.assertTrue(checkpoints.verify_checksums(
          os.path.join(self._run, "checkpoints", str(step))))
    restored, reports = _restore(self._copy())
    self.assertEqual((int(restored.step), reports), (6, []))

  def test_flipped_bytes_fail_the_checksum_and_fall_back(self):
    # 64 random bytes in the middle of the data: orbax alone would restore them as numbers.
    workdir = self._copy()
    path = _state_file(workdir, 6)
    with open(path, "r+b") as f:
      f.seek(os.path.getsize(path) // 2)
      f.write(np.random.default_rng(0).bytes(64))
    self._assert_fell_back_to_step_3(workdir, "does not match its checksum")

  def test_truncated_file_falls_back(self):
    workdir = self._copy()
    path = _state_file(workdir, 6)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 3)
    self._assert_fell_back_to_step_3(workdir, "does not match its checksum")

  def test_deleted_file_falls_back(self):
    workdir = self._copy()
    os.remove(_state_file(workdir, 6))
    self._assert_fell_back_to_step_3(workdir, "is missing")

  def test_checkpoint_without_checksums_restores_with_a_warning(self):
    workdir = self._copy()
    os.remove(os.path.join(workdir, "checkpoints", "6", checkpoints.CHECKSUMS))
    restored, reports = _restore(workdir)
    self.assertEqual(int(restored.step), 6)
    self.assertLen(reports, 1)
    self.assertIn("checkpoint step 6 has no checksums.json", reports[0])

  def test_quarantine_never_overwrites_an_earlier_one(self):
    workdir = self._copy()
    earlier = os.path.join(workdir, "checkpoints_corrupt", "6")
    os.makedirs(earlier)
    with open(os.path.join(earlier, "keep.txt"), "w") as f:
      f.write("an earlier quarantine")
    os.remove(_state_file(workdir, 6))
    restored, reports = _restore(workdir)
    self.assertEqual(int(restored.step), 3)
    self.assertIn("checkpoints_corrupt/6.1", reports[0])
    self.assertEqual(os.listdir(earlier), ["keep.txt"])
    self.assertTrue(os.path.isdir(os.path.join(workdir, "checkpoints_corrupt", "6.1", "state")))

  def test_every_checkpoint_bad_stops_and_moves_nothing(self):
    workdir = self._copy()
    for step in (3, 6):
      os.remove(_state_file(workdir, step))
    before = testing.tree_bytes(workdir)
    with self.assertRaisesRegex(checkpoints.NoRestorableCheckpointError,
                                r"no checkpoint in .* can be restored \(step 6: .*is missing; "
                                r"step 3: .*\)\. Nothing was moved\. To train from step 0"):
      _restore(workdir)
    self.assertEqual(testing.tree_bytes(workdir), before)
    self.assertFalse(os.path.exists(os.path.join(workdir, "checkpoints_corrupt")))

  def test_unreadable_file_is_reported_not_quarantined(self):
    # Tests run as root, which reads any file: the permission error is injected.
    workdir = self._copy()
    blocked = _state_file(workdir, 6)
    real_open = open

    def guarded_open(path, *args, **kwargs):
      if os.path.abspath(path) == os.path.abspath(blocked):
        raise PermissionError(13, "Permission denied", path)
      return real_open(path, *args, **kwargs)

    before = testing.tree_bytes(workdir)
    with mock.patch.object(checkpoints, "open", guarded_open, create=True):
      with self.assertRaisesRegex(checkpoints.CheckpointError,
                                  r"cannot read .* \(permission denied\).*Nothing was moved"):
        _restore(workdir)
    self.assertEqual(testing.tree_bytes(workdir), before)

  def test_unreadable_step_folder_is_reported_not_quarantined(self):
    # os.path.exists reads a permission error as "missing": the step looked unchecksummed, then
    # failed in orbax and was moved to checkpoints_corrupt/.
    workdir = self._copy()
    step_dir = os.path.join(workdir, "checkpoints", "6")
    before = testing.tree_bytes(workdir)
    with _unreadable_folder(step_dir):
      with self.assertRaisesRegex(checkpoints.CheckpointError,
                                  rf"^cannot read {step_dir}/\S+ \(permission denied\): fix the "
                                  r"permissions of it or of a folder above it .*Nothing was moved"):
        _restore(workdir)
    self.assertEqual(testing.tree_bytes(workdir), before)

  def test_permission_error_inside_orbax_is_reported_not_quarantined(self):
    # A step without checksums goes straight to orbax: its permission errors, Python's (here
    # under another exception) or tensorstore's, must not read as corruption.
    workdir = self._copy()
    os.remove(os.path.join(workdir, "checkpoints", "6", checkpoints.CHECKSUMS))
    blocked = _state_file(workdir, 6)
    state = os.path.join(workdir, "checkpoints", "6", "state")
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          _target_state(()).params)
    real_restore = ocp.CheckpointManager.restore

    def python_error():
      try:
        raise PermissionError(errno.EACCES, "Permission denied", blocked)
      except PermissionError as e:
        raise RuntimeError("restore of item 'state' failed") from e

    def tensorstore_error():
      raise ValueError(_TENSORSTORE_DENIED.format(state=state, file=blocked))

    for raise_error in (python_error, tensorstore_error):
      def restore(manager, step, *args, raise_error=raise_error, **kwargs):
        if step == 6:
          raise_error()
        return real_restore(manager, step, *args, **kwargs)

      before = testing.tree_bytes(workdir)
      with mock.patch.object(ocp.CheckpointManager, "restore", restore):
        with self.assertRaisesRegex(checkpoints.CheckpointError,
                                    rf"^cannot read {blocked} \(permission denied\).*Nothing was "
                                    "moved"):
          _restore(workdir)
        with self.assertRaisesRegex(checkpoints.CheckpointError,
                                    rf"^cannot read {blocked} \(permission denied\)"):
          checkpoints.restore_params(os.path.join(workdir, "checkpoints"), params,
                                     report=lambda _: None)
      self.assertEqual(testing.tree_bytes(workdir), before)

  def test_other_parameter_shapes_are_a_mismatch_not_corruption(self):
    workdir = self._copy()
    before = testing.tree_bytes(workdir)
    with self.assertRaisesRegex(checkpoints.CheckpointMismatchError,
                                r"checkpoint step 6 .* does not fit this model .*stored shape"
                                r".*Nothing was moved"):
      _restore(workdir, **{"model.width": 128})
    self.assertEqual(testing.tree_bytes(workdir), before)

  def test_restore_params_verifies_checksums(self):
    workdir = self._copy()
    path = _state_file(workdir, 6)
    with open(path, "r+b") as f:
      f.write(b"\xff" * 8)
    config = _config()
    _, abstract = state_lib.model_graphdef(config.model, _VOCAB)
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          abstract.to_pure_dict())
    directory = os.path.join(workdir, "checkpoints")
    with self.assertRaisesRegex(checkpoints.CheckpointError, "step 6 .* is corrupt .*--step="):
      checkpoints.restore_params(directory, target)
    step, _ = checkpoints.restore_params(directory, target, step=3)
    self.assertEqual(step, 3)


class ChecksumTimingTest(absltest.TestCase):
  """Every committed step gets its checksums, however close together the saves are."""

  def test_back_to_back_saves_all_get_checksums(self):
    # Each save waits in orbax for the previous one: a step added to the pending list then was
    # taken (and dropped, having no folder yet) by the previous save's callback.
    directory = os.path.join(self.create_tempdir().full_path, "checkpoints")
    data_iter = iter(grain.MapDataset.range(8).to_iter_dataset())
    state = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(0)}
    ckpt = checkpoints.Checkpointer(directory, keep=10)
    try:
      for step in range(1, 6):
        ckpt.save(step, {**state, "step": jnp.int32(step)}, data_iter, {"step": step})
    finally:
      ckpt.close()
    self.assertEqual(sorted(os.listdir(directory), key=int), [str(s) for s in range(1, 6)])
    for step in range(1, 6):
      self.assertTrue(checkpoints.verify_checksums(os.path.join(directory, str(step))),
                      f"step {step} has no {checkpoints.CHECKSUMS}")


if __name__ == "__main__":
  absltest.main()
