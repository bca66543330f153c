"""Positional encodings against closed forms and brute-force definitions."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from longjax import posenc


class RopeTest(parameterized.TestCase):

  def test_dot_product_depends_only_on_distance(self):
    rng = np.random.RandomState(0)
    q = jnp.asarray(rng.randn(1, 1, 1, 16), jnp.float32)
    k = jnp.asarray(rng.randn(1, 1, 1, 16), jnp.float32)
    inv_freq = posenc.rope_inv_freq(16)

    def score(m, n):
      qm = posenc.apply_rope(q, jnp.array([[m]]), inv_freq)
      kn = posenc.apply_rope(k, jnp.array([[n]]), inv_freq)
      return float(jnp.sum(qm * kn))

    for m, n, shift in [(5, 2, 100), (0, 0, 37), (3, 9, 1000)]:
      self.assertAlmostEqual(score(m, n), score(m + shift, n + shift), places=3)
    self.assertNotAlmostEqual(score(5, 2), score(5, 3), places=3)

  def test_matches_complex_rotation(self):
    # Independent definition: pair feature i with i + H/2 as a complex number, multiply by
    # exp(i * p * theta^(-2i/H)).
    rng = np.random.RandomState(1)
    x = rng.randn(2, 5, 3, 8).astype(np.float32)
    pos = rng.randint(0, 1000, (2, 5))
    freqs = 10_000.0 ** (-np.arange(0, 8, 2) / 8)
    z = (x[..., :4] + 1j * x[..., 4:]) * np.exp(1j * pos[:, :, None, None] * freqs)
    expected = np.concatenate([z.real, z.imag], axis=-1)
    got = posenc.apply_rope(jnp.asarray(x), jnp.asarray(pos), posenc.rope_inv_freq(8))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

  def test_position_zero_is_identity_and_norm_preserved(self):
    x = jnp.asarray(np.random.RandomState(2).randn(1, 4, 2, 32), jnp.float32)
    inv_freq = posenc.rope_inv_freq(32)
    np.testing.assert_allclose(posenc.apply_rope(x, jnp.zeros((1, 4), jnp.int32), inv_freq), x,
                               atol=1e-6)
    rotated = posenc.apply_rope(x, jnp.arange(4)[None] * 77, inv_freq)
    np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(x, axis=-1),
                               rtol=1e-5)

  def test_bfloat16_keeps_dtype(self):
    x = jnp.ones((1, 2, 1, 8), jnp.bfloat16)
    self.assertEqual(posenc.apply_rope(x, jnp.ones((1, 2), jnp.int32),
                                       posenc.rope_inv_freq(8)).dtype, jnp.bfloat16)


class AlibiTest(parameterized.TestCase):

  def test_eight_heads_closed_form(self):
    # Paper: for 8 heads the slopes are 1/2, 1/4, ..., 1/256.
    np.testing.assert_allclose(posenc.alibi_slopes(8), [2.0**-(i + 1) for i in range(8)])

  def test_twelve_heads_interleave(self):
    # Paper's rule for non-powers of two: the 8-head slopes, then every other slope of the
    # 16-head sequence 2^(-0.5 i), i = 1..16, i.e. 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    expected = [2.0**-(i + 1) for i in range(8)] + [2.0**-(0.5 + i) for i in range(4)]
    np.testing.assert_allclose(posenc.alibi_slopes(12), expected, rtol=1e-6)

  def test_one_head(self):
    np.testing.assert_allclose(posenc.alibi_slopes(1), [2.0**-8])


class SinusoidalTest(absltest.TestCase):

  def test_matches_vaswani_formula(self):
    pos = np.array([[0, 1, 7, 300]])
    width = 6
    got = np.asarray(posenc.sinusoidal_encoding(jnp.asarray(pos), width))
    for j, p in enumerate(pos[0]):
      for i in range(width // 2):
        angle = p / 10_000.0 ** (i / (width // 2))
        self.assertAlmostEqual(got[0, j, i], np.sin(angle), places=4)
        self.assertAlmostEqual(got[0, j, i + width // 2], np.cos(angle), places=4)


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  absltest.main()
