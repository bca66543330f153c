"""T5, KERPLE, FIRE and ALiBi logit biases against hand-computed values and the formulas."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from longjax import posenc
from longjax.layers import positional_bias
from longjax.ops import AlibiBias
from longjax.ops import FireBias
from longjax.ops import KerpleBias
from longjax.ops import T5Bias
from tests.posenc import reference_biases


def random_positions(rng, batch, length, high=400):
  return jnp.asarray(np.sort(rng.integers(0, high, (batch, length)), axis=1), jnp.int32)


class T5BucketTest(parameterized.TestCase):

  def test_causal_buckets_at_known_distances(self):
    # 32 buckets, max distance 128: distances 0..15 exact; then 16 + floor(16 ln(n/16) / ln 8),
    # e.g. n = 20: 16 ln(1.25) / ln 8 = 1.72 -> 17; n = 32: 5.33 -> 21; n = 64: 10.67 -> 26;
    # n = 100: 14.10 -> 30; n = 127: 15.94 -> 31; n >= 128: the last bucket, 31. Keys after the
    # query (n < 0) share bucket 0.
    expected = {0: 0, 1: 1, 15: 15, 16: 16, 17: 16, 20: 17, 32: 21, 64: 26, 100: 30, 127: 31,
                128: 31, 5000: 31, -1: 0, -300: 0}
    d = np.array(list(expected))
    got = posenc.t5_buckets(jnp.asarray(d)[None], jnp.zeros((1, 1), jnp.int32), num_buckets=32,
                            max_distance=128, bidirectional=False)
    np.testing.assert_array_equal(np.asarray(got)[0, :, 0], list(expected.values()))

  def test_bidirectional_buckets_at_known_distances(self):
    # 16 buckets per direction, 8 exact: 8 + floor(8 ln(n/8) / ln 16). The boundaries n = 16,
    # 32, 64 land exactly on 2, 4, 6, where a float32 log could round down. Keys after the query
    # (i - j < 0) use buckets 16..31.
    expected = {0: 0, 7: 7, 8: 8, 15: 9, 16: 10, 32: 12, 63: 13, 64: 14, 127: 15, 128: 15,
                -1: 17, -8: 24, -16: 26, -64: 30, -128: 31, -999: 31}
    d = np.array(list(expected))
    got = posenc.t5_buckets(jnp.zeros((1, 1), jnp.int32), -jnp.asarray(d)[None], num_buckets=32,
                            max_distance=128, bidirectional=True)
    np.testing.assert_array_equal(np.asarray(got)[0, 0], list(expected.values()))

  @parameterized.product(config=((32, 128), (8, 20), (64, 1000), (2, 3)),
                         bidirectional=(False, True))
  def test_table_matches_the_formula_everywhere(self, config, bidirectional):
    num_buckets, max_distance = config
    if bidirectional and num_buckets < 4:
      return
    table = posenc.t5_bucket_table(num_buckets, max_distance, bidirectional)
    d = np.arange(-max_distance - 5, max_distance + 6)
    got = posenc.t5_buckets(jnp.asarray(d)[None], jnp.zeros((1, 1), jnp.int32),
                            num_buckets=num_buckets, max_distance=max_distance,
                            bidirectional=bidirectional)
    want = [reference_biases.t5_bucket(int(x), num_buckets, max_distance, bidirectional)
            for x in d]
    np.testing.assert_array_equal(np.asarray(got)[0, :, 0], want)
    self.assertEqual(table.max(), num_buckets - 1)  # every bucket is reachable


class BiasValuesTest(parameterized.TestCase):

  def test_alibi_by_hand(self):
    # Head slopes 1/2 and 1/4; query at 5 against keys at 0, 3, 5, 9: -m |i - j|.
    bias = AlibiBias(jnp.asarray([0.5, 0.25]), jnp.asarray([[5]]), jnp.asarray([[0, 3, 5, 9]]))
    np.testing.assert_allclose(bias.block(0, 1, 0, 4)[0, :, 0],
                               [[-2.5, -1.0, 0.0, -2.0], [-1.25, -0.5, 0.0, -1.0]])

  def test_kerple_by_hand(self):
    # r1 = 2, r2 = 0.5 at distances 0, 1, 4: log: -2 ln(1 + 0.5 d); power: -2 d^0.5.
    q, kv = jnp.asarray([[4]]), jnp.asarray([[4, 3, 0]])
    log = posenc.kerple_bias(jnp.asarray([2.0]), jnp.asarray([0.5]), q, kv, kind="log")
    power = posenc.kerple_bias(jnp.asarray([2.0]), jnp.asarray([0.5]), q, kv, kind="power")
    np.testing.assert_allclose(log[0, 0, 0], [0.0, -2 * np.log(1.5), -2 * np.log(3.0)],
                               rtol=1e-6)
    np.testing.assert_allclose(power[0, 0, 0], [0.0, -2.0, -4.0], rtol=1e-6)

  def test_kerple_power_gradient_is_finite_at_distance_zero(self):
    # d^r2 at d = 0: the derivative w.r.t. r2 is 0 * log(0) in a naive implementation.
    grad = jax.grad(lambda r2: posenc.kerple_bias(jnp.ones(1), r2, jnp.zeros((1, 1), jnp.int32),
                                                  jnp.asarray([[0, 2]]), kind="power").sum())
    np.testing.assert_allclose(grad(jnp.asarray([1.5])), [-2**1.5 * np.log(2.0)], rtol=1e-6)

  def test_fire_by_hand(self):
    # c = 1, L = 4, one hidden unit relu(x) and output weight -3: the bias of a query at i and a
    # key at j is -3 ln(1 + |i - j|) / ln(1 + max(4, i)).
    fire = posenc.FireParams(c=jnp.float32(1.0), threshold=jnp.float32(4.0), w1=jnp.ones(1),
                             b1=jnp.zeros(1), w2=-3 * jnp.ones((1, 1)), b2=jnp.zeros(1))
    got = posenc.fire_bias(fire, jnp.asarray([[2, 9]]), jnp.asarray([[0, 2]]))[0, 0]
    psi = lambda x: np.log1p(x)
    want = [[-3 * psi(2) / psi(4), 0.0], [-3 * psi(9) / psi(9), -3 * psi(7) / psi(9)]]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  @parameterized.parameters("t5", "t5_bidirectional", "kerple_log", "kerple_power", "fire")
  def test_blocks_assemble_to_the_formula(self, kind):
    # Blocks of 8 over 21 queries and 30 keys (padded, positions restarting mid-row) equal the
    # float64 formula on the real entries.
    rng = np.random.default_rng(0)
    q_pos, kv_pos = random_positions(rng, 2, 21), random_positions(rng, 2, 30)
    n = 3
    if kind.startswith("t5"):
      table = jnp.asarray(rng.normal(size=(16, n)), jnp.float32)
      bidirectional = kind == "t5_bidirectional"
      spec = T5Bias(table=table, q_positions=q_pos, kv_positions=kv_pos, max_distance=50,
                    bidirectional=bidirectional)
      want = reference_biases.t5(table, q_pos, kv_pos, 50, bidirectional)
    elif kind.startswith("kerple"):
      r1, r2 = (jnp.asarray(rng.uniform(0.1, 2.0, n), jnp.float32) for _ in range(2))
      spec = KerpleBias(r1=r1, r2=r2, q_positions=q_pos, kv_positions=kv_pos, kind=kind[7:])
      want = reference_biases.kerple(r1, r2, q_pos, kv_pos, kind[7:])
    else:
      fire = posenc.FireParams(jnp.float32(0.2), jnp.float32(64.0),
                               *(jnp.asarray(rng.normal(size=shape), jnp.float32)
                                 for shape in ((5,), (5,), (5, n), (n,))))
      spec = FireBias(params=fire, q_positions=q_pos, kv_positions=kv_pos)
      want = reference_biases.fire(*fire, q_pos, kv_pos)
    rows = [jnp.concatenate([spec.block(i, 8, j, 8) for j in range(0, 32, 8)], axis=-1)
            for i in range(0, 24, 8)]
    got = np.asarray(jnp.concatenate(rows, axis=-2))[:, :, :21, :30]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def bias_at_init(kind: str, query_position: int, num_heads: int = 8, seed: int = 0):
  """[N, query_position + 1]: the initial bias of a query against keys at distance 0, 1, ..."""
  cfg = {"kerple_log": dict(kind="log"), "kerple_power": dict(kind="power"), "fire": {}}[kind]
  make = positional_bias.FirePositions if kind == "fire" else positional_bias.KerplePositions
  module = make(num_heads, **cfg, rngs=nnx.Rngs(seed))
  keys = query_position - jnp.arange(query_position + 1, dtype=jnp.int32)  # distance 0, 1, ...
  bias = module.bias(jnp.asarray([[query_position]]), keys[None])
  return np.asarray(bias.block(0, 1, 0, query_position + 1))[0, :, 0], module


class InitialisationTest(parameterized.TestCase):

  @parameterized.product(kind=("kerple_log", "kerple_power", "fire"),
                         query_position=(7, 300, 2000), seed=(0, 1))
  def test_monotone_non_increasing_in_distance(self, kind, query_position, seed):
    bias, _ = bias_at_init(kind, query_position, seed=seed)
    steps = np.diff(bias, axis=-1)
    self.assertTrue((steps <= 1e-6).all(), f"largest increase {steps.max()}")
    self.assertTrue((steps < 0).any())  # and not flat

  @parameterized.parameters("log", "power")
  def test_kerple_constraints_and_paper_init(self, kind):
    module = positional_bias.KerplePositions(64, kind=kind, rngs=nnx.Rngs(0))
    r1, r2 = (np.asarray(r) for r in module.kernel_parameters())
    (r1_lo, r1_hi), (r2_lo, r2_hi) = positional_bias.KERPLE_INIT[kind]
    floor = positional_bias.KERPLE_FLOOR
    for r, lo, hi in ((r1, r1_lo, r1_hi), (r2, r2_lo, r2_hi)):
      self.assertTrue((r >= np.float32(floor)).all() and (r <= hi).all())
      self.assertGreater(r.std(), 0.1 * (hi - lo))  # uniform over heads, not constant
    # Any raw value keeps the constraints: r >= 0.01, and r2 <= 2 for the power kernel.
    module.raw_r1.value = jnp.full((64,), -50.0)
    module.raw_r2.value = jnp.full((64,), 50.0)
    r1, r2 = module.kernel_parameters()
    self.assertGreaterEqual(float(r1.min()), np.float32(floor))
    if kind == "power":
      self.assertLessEqual(float(r2.max()), positional_bias.KERPLE_MAX_POWER)

  def test_fire_paper_init(self):
    module = positional_bias.FirePositions(4, rngs=nnx.Rngs(0))
    fire = module.fire_params()
    self.assertAlmostEqual(float(fire.c), 0.1, places=6)
    self.assertAlmostEqual(float(fire.threshold), 512.0, places=3)
    self.assertEqual(fire.w1.shape, (32,))
    self.assertEqual(fire.w2.shape, (32, 4))

  def test_t5_table_starts_at_zero(self):
    module = positional_bias.T5Positions(4, rngs=nnx.Rngs(0))
    self.assertEqual(module.table.shape, (32, 4))
    np.testing.assert_array_equal(module.table.value, 0.0)
    with self.assertRaisesRegex(ValueError, "max_distance"):
      positional_bias.T5Positions(4, num_buckets=32, max_distance=16, rngs=nnx.Rngs(0))


if __name__ == "__main__":
  absltest.main()
