"""Training-time position transforms: randomized positions and PoSE skip-wise positions."""

import dataclasses
import functools
import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from configs import quickstart
from longjax import configuration
from longjax import experiment
from longjax.parallel import mesh as mesh_lib
from longjax.posenc import position_transforms as pt
from longjax.training import state as state_lib, step as step_lib
from longjax.training.metrics import read_metrics
from tests import testing

_T = 48
_BOUND = 160  # max_position / target_length of the tests
_TRANSFORMS = {
    "none": pt.none,
    "randomized": functools.partial(pt.randomized, max_position=_BOUND),
    "pose2": functools.partial(pt.pose, num_chunks=2, target_length=_BOUND),
    "pose3": functools.partial(pt.pose, num_chunks=3, target_length=_BOUND),
}


def _packed_batch(seed: int, batch: int = 6) -> tuple[np.ndarray, np.ndarray]:
  """Rows of 1..4 documents of random lengths, then padding, like the data pipeline's.

  Returns:
    positions, segment_ids: [batch, _T] int32; positions restart at 0 per segment, and padding
    (segment 0) carries a marker value -7 that a transform must leave alone.
  """
  rng = np.random.RandomState(seed)
  segments = np.zeros((batch, _T), np.int32)
  positions = np.full((batch, _T), -7, np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, _T), rng.randint(1, 5), replace=False))
    bounds = [0, *cuts, _T]
    runs = list(itertools.pairwise(bounds))
    if row % 2:  # odd rows end in padding
      runs = runs[:-1]
    for seg, (lo, hi) in enumerate(runs, start=1):
      segments[row, lo:hi] = seg
      positions[row, lo:hi] = np.arange(hi - lo)
  return positions, segments


def _runs(segment_ids_row: np.ndarray):
  """(start, end) of each non-padding segment of one row, by brute force."""
  runs, start = [], 0
  for t in range(1, len(segment_ids_row) + 1):
    if t == len(segment_ids_row) or segment_ids_row[t] != segment_ids_row[start]:
      if segment_ids_row[start]:
        runs.append((start, t))
      start = t
  return runs


class PositionTransformTest(parameterized.TestCase):

  @parameterized.named_parameters((name, name) for name in _TRANSFORMS)
  def test_increasing_per_segment_padding_kept_in_range(self, name):
    fn = jax.jit(_TRANSFORMS[name])
    restarted = False
    for seed in range(8):
      positions, segments = _packed_batch(seed)
      out = np.asarray(fn(jnp.asarray(positions), jnp.asarray(segments), jax.random.key(seed)))
      self.assertEqual(out.dtype, np.int32)
      np.testing.assert_array_equal(out[segments == 0], positions[segments == 0])
      bound = _T if name == "none" else _BOUND
      for row in range(len(out)):
        runs = _runs(segments[row])
        for i, (lo, hi) in enumerate(runs):
          seg = out[row, lo:hi]
          self.assertTrue(np.all(np.diff(seg) > 0), (name, seg))
          self.assertGreaterEqual(seg.min(), 0)
          self.assertLess(seg.max(), bound)
          if i and seg[0] <= out[row, runs[i - 1][1] - 1]:
            restarted = True
    # Positions restart per segment: a segment may begin below the end of the one before.
    self.assertTrue(restarted)

  @parameterized.named_parameters((name, name) for name in _TRANSFORMS)
  def test_deterministic_for_a_key(self, name):
    positions, segments = map(jnp.asarray, _packed_batch(0))
    fn = jax.jit(_TRANSFORMS[name])
    a = fn(positions, segments, jax.random.key(3))
    b = fn(positions, segments, jax.random.key(3))
    c = fn(positions, segments, jax.random.key(4))
    np.testing.assert_array_equal(a, b)
    self.assertEqual(name == "none", bool(np.all(a == c)))

  def test_randomized_is_a_uniform_subset(self):
    # One document of n tokens per row: each value of [0, M) belongs to the drawn subset with
    # probability n / M, and the smallest one, E[min] = (M - n) / (n + 1), is rarely 0.
    rows, n, m = 4000, 4, 64
    segments = jnp.ones((rows, n), jnp.int32)
    fn = jax.jit(functools.partial(pt.randomized, max_position=m))
    out = np.asarray(fn(jnp.zeros((rows, n), jnp.int32), segments, jax.random.key(0)))
    self.assertTrue(np.all(np.diff(out, axis=1) > 0))  # sorted and distinct
    counts = np.bincount(out.ravel(), minlength=m)
    expected = rows * n / m  # 250, binomial standard deviation ~ 15
    self.assertLess(np.abs(counts - expected).max(), 6 * np.sqrt(expected))
    first = out[:, 0]
    self.assertAlmostEqual(first.mean(), (m - n) / (n + 1), delta=0.6)
    self.assertGreater(first.max(), m // 2)
    self.assertAlmostEqual(np.mean(first == 0), n / m, delta=0.02)

  def test_pose_chunks_and_skip_biases(self):
    rows, n, target = 3000, 40, 200
    segments = jnp.ones((rows, n), jnp.int32)
    fn = jax.jit(functools.partial(pt.pose, num_chunks=2, target_length=target))
    out = np.asarray(fn(jnp.zeros((rows, n), jnp.int32), segments, jax.random.key(1)))
    steps = np.diff(out, axis=1)
    np.testing.assert_array_equal(out[:, 0], 0)  # u_0 = 0
    # Two contiguous chunks: every step is 1 except at most one skip.
    self.assertTrue(np.all(np.sum(steps != 1, axis=1) <= 1))
    self.assertLess(out.max(), target)
    # The second chunk's bias u_1 = last - (n - 1) is uniform on {0, ..., target - n}.
    bias = out[:, -1] - (n - 1)
    self.assertAlmostEqual(bias.mean(), (target - n) / 2, delta=4.0)
    self.assertEqual(bias.min(), 0)
    self.assertEqual(bias.max(), target - n)
    # The cut point is uniform on 1..n-1.
    skipped = np.argmax(steps != 1, axis=1)[bias > 0] + 1
    self.assertAlmostEqual(skipped.mean(), n / 2, delta=1.0)

  def test_pose_more_chunks(self):
    rows, n = 500, 30
    fn = jax.jit(functools.partial(pt.pose, num_chunks=4, target_length=300))
    out = np.asarray(fn(jnp.zeros((rows, n), jnp.int32), jnp.ones((rows, n), jnp.int32),
                        jax.random.key(2)))
    self.assertTrue(np.all(np.sum(np.diff(out, axis=1) != 1, axis=1) <= 3))
    self.assertTrue(np.any(np.sum(np.diff(out, axis=1) != 1, axis=1) == 3))
    self.assertLess(out.max(), 300)

  def test_bad_arguments(self):
    positions, segments = map(jnp.asarray, _packed_batch(0))
    with self.assertRaisesRegex(ValueError, "max_position"):
      pt.randomized(positions, segments, jax.random.key(0), max_position=_T - 1)
    with self.assertRaisesRegex(ValueError, "target_length"):
      pt.pose(positions, segments, jax.random.key(0), num_chunks=2, target_length=_T - 1)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("unknown", {"model.posenc.train_positions": "shuffled"},
       "train_positions.*valid: clex, none, pose, randomized"),
      ("short_range", {"model.posenc.train_positions": "randomized",
                       "model.posenc.randomized_max_position": 16}, "randomized_max_position"),
      ("short_target", {"model.posenc.train_positions": "pose",
                        "model.posenc.pose_target_length": 16}, "pose_target_length"),
      ("no_chunks", {"model.posenc.train_positions": "pose", "model.posenc.pose_chunks": 0},
       "pose_chunks"),
      ("past_learned_table", {"model.posenc.train_positions": "randomized",
                              "model.posenc.kind": "learned", "model.posenc.max_length": 64,
                              "model.posenc.randomized_max_position": 128},
       "randomized_max_position=128.*learned table"),
  )
  def test_errors(self, overrides, pattern):
    config = testing.apply_overrides(quickstart.get_config("tiny"), overrides)
    with self.assertRaisesRegex(configuration.ConfigError, pattern):
      configuration.validate(config, 1)


class TrainTest(parameterized.TestCase):

  def test_train_step_draws_positions_from_the_step(self):
    config = quickstart.get_config("tiny")
    t = config.data.seq_len
    tx, schedule = state_lib.make_model_optimizer(config.model, config.train, vocab_size=259)
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
    graphdef, state, _ = state_lib.create_train_state(
        config.model, tx, vocab_size=259, mesh=mesh,
        rules=mesh_lib.parse_rules(config.mesh.rules), seed=0)
    tokens = np.random.RandomState(0).randint(3, 259, (2, t + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "segment_ids": np.ones((2, t), np.int32),
             "positions": np.tile(np.arange(t, dtype=np.int32), (2, 1)),
             "weights": np.ones((2, t), np.float32)}

    def step_fn(transform):
      fn = jax.jit(functools.partial(step_lib.train_step, graphdef, tx, schedule,
                                     position_transform=transform, position_seed=0))
      return lambda step: float(fn(dataclasses.replace(
          state, step=jnp.asarray(step, state.step.dtype)), batch)[1]["loss"])

    plain = step_fn(None)
    randomized = step_fn(functools.partial(pt.randomized, max_position=4 * t))
    self.assertNotEqual(plain(3), randomized(3))  # the model sees the drawn positions
    self.assertEqual(randomized(3), randomized(3))  # the draw is a function of the step alone
    self.assertNotEqual(randomized(3), randomized(4))

  @parameterized.named_parameters(
      ("randomized", {"model.posenc.train_positions": "randomized",
                      "model.posenc.randomized_max_position": 128}),
      ("pose", {"model.posenc.train_positions": "pose", "model.posenc.pose_target_length": 128}),
  )
  def test_trains(self, overrides):
    workdir = self.create_tempdir().full_path
    # Evaluation (never transformed) at the training length only, to keep the test short.
    config = testing.tiny_config(**{"train.steps": 20, "train.log_every": 5,
                                    "eval.lengths": "1x", **overrides})
    result = experiment.train_and_evaluate(config, workdir, progress=False)
    losses = [m["loss"] for m in read_metrics(workdir) if "loss" in m]
    self.assertTrue(np.all(np.isfinite(losses)))
    self.assertLess(losses[-1], losses[0] - 0.3)
    self.assertTrue(np.isfinite(result.val_loss))


if __name__ == "__main__":
  absltest.main()
