"""xPos and CLEX: closed forms, an independent ODE solve, position sampling, prefill == decode
and training."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from longjax import posenc
from longjax.models import build_model
from longjax.posenc import clex, position_transforms, xpos
from tests.models.lm_test import TOLERANCE
from tests.models.lm_test import _forward
from tests.models.lm_test import decode_one_by_one
from tests.models.lm_test import tiny_model_config
from tests.models.learned_bias_model_test import train_on_counting


def _xpos_logit(q, k, m, n, *, rotary_dim, theta, gamma, scale_base):
  """q_m . k_n by the paper's formula in float64: per pair, the complex RoPE product times
  zeta_i^((m - n) / B); features past the rotary dim contribute a plain dot product."""
  half = rotary_dim // 2
  freq = theta ** (-np.arange(half) * 2.0 / rotary_dim)
  zeta = (np.arange(half) * 2.0 / rotary_dim + gamma) / (1 + gamma)
  qc = q[:half] + 1j * q[half:rotary_dim]
  kc = k[:half] + 1j * k[half:rotary_dim]
  pairs = np.real(qc * np.conj(kc) * np.exp(1j * (m - n) * freq)) * zeta ** ((m - n) / scale_base)
  return pairs.sum() + q[rotary_dim:] @ k[rotary_dim:]


def _apply(x, position, *, is_key, rotary_dim=8, gamma=0.4, scale_base=16.0):
  inv_freq = posenc.rope_inv_freq(rotary_dim, 10_000.0)
  out = posenc.apply_xpos(jnp.asarray(x, jnp.float32)[None, None, None],
                          jnp.full((1, 1), position, jnp.int32), inv_freq, is_key=is_key,
                          gamma=gamma, scale_base=scale_base)
  return np.asarray(out[0, 0, 0], np.float64)


class XposTest(parameterized.TestCase):

  @parameterized.parameters((8, 8), (12, 8))  # full and partial rotary
  def test_logits_equal_closed_form_and_depend_on_distance_only(self, head_dim, rotary_dim):
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(2, head_dim))
    for m, n in [(0, 0), (5, 2), (40, 3), (100, 99), (130, 31)]:
      got = _apply(q, m, is_key=False, rotary_dim=rotary_dim) @ _apply(
          k, n, is_key=True, rotary_dim=rotary_dim)
      want = _xpos_logit(q, k, m, n, rotary_dim=rotary_dim, theta=10_000.0, gamma=0.4,
                         scale_base=16.0)
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
      shifted = _apply(q, m + 17, is_key=False, rotary_dim=rotary_dim) @ _apply(
          k, n + 17, is_key=True, rotary_dim=rotary_dim)
      np.testing.assert_allclose(shifted, got, rtol=2e-5, atol=2e-5)

  def test_decay_rates_and_untouched_features(self):
    np.testing.assert_allclose(xpos.xpos_decay_rates(8, 0.4),
                               [(0 + 0.4) / 1.4, (0.25 + 0.4) / 1.4, (0.5 + 0.4) / 1.4,
                                (0.75 + 0.4) / 1.4], rtol=1e-6)
    x = np.arange(12.0)
    np.testing.assert_array_equal(_apply(x, 33, is_key=True)[8:], x[8:])

  def test_scales_stay_finite_up_to_max_position(self):
    limit = xpos.max_position(0.4, 512.0)
    self.assertBetween(limit, 30_000, 40_000)  # ~36k: the module docstring's figure
    ones = np.ones(8)
    for is_key in (False, True):
      out = _apply(ones, limit, is_key=is_key, scale_base=512.0)
      self.assertTrue(np.isfinite(out).all() and np.abs(out).max() > 0)


class ClexOdeTest(parameterized.TestCase):

  @parameterized.parameters(1.0, 1.5, 2.0, 8.0, 64.0)
  def test_untrained_clex_is_ntk_with_alpha_2t_minus_1(self, t):
    rotary, theta = 16, 10_000.0
    params = clex.init_params(jax.random.key(0), rotary)
    got = clex.clex_inv_freq(params, t, rotary_dim=rotary, theta=theta)
    base = theta * (2 * t - 1) ** (rotary / (rotary - 2))  # NTK-aware base for alpha = 2t - 1
    want = base ** (-np.arange(0, rotary, 2) / rotary)
    np.testing.assert_allclose(got, want, rtol=2e-5)

  def test_learned_dynamics_match_a_fine_euler_solve(self):
    rotary, theta, t_end = 8, 10_000.0, 5.0
    k1, k2 = jax.random.split(jax.random.key(1))
    params = {"w1": jax.random.normal(k1, (4, 8)) * 0.3,
              "w2": jax.random.normal(k2, (8, 4)) * 0.05}
    got = clex.clex_inv_freq(params, t_end, rotary_dim=rotary, theta=theta)
    # Independent: explicit Euler in t itself, float64, 200k steps.
    w1, w2 = (np.asarray(p, np.float64) for p in (params["w1"], params["w2"]))
    i = np.arange(rotary // 2)
    z = -(2.0 * i / rotary) * np.log(theta)
    steps = 200_000
    dt = (t_end - 1.0) / steps
    for s in range(steps):
      t = 1.0 + s * dt
      alpha = 2 * t - 1
      log_ntk = -(2.0 * i / rotary) * np.log(theta) - 2.0 * i / (rotary - 2) * np.log(alpha)
      h = (z + log_ntk) / np.log(theta) @ w1
      z = z + dt * ((h / (1 + np.exp(-h))) @ w2 - 2.0 * i / (rotary - 2) * 2.0 / alpha)
      z = np.clip(z, clex.Z_MIN, 0.0)
    self.assertGreater(np.abs(z - np.log(clex.clex_inv_freq(
        clex.init_params(k1, rotary), t_end, rotary_dim=rotary, theta=theta))).max(), 0.1)
    np.testing.assert_allclose(np.log(got), z, rtol=0, atol=1e-4)  # log frequencies

  def test_scale_one_is_plain_rope_and_gradients_reach_the_ode_only_beyond_it(self):
    rotary = 8
    params = clex.init_params(jax.random.key(0), rotary)
    np.testing.assert_allclose(clex.clex_inv_freq(params, 1.0, rotary_dim=rotary, theta=500.0),
                               posenc.rope_inv_freq(rotary, 500.0), rtol=1e-6)
    grad = lambda t: jax.grad(lambda p: clex.clex_inv_freq(
        p, t, rotary_dim=rotary, theta=500.0).sum())(params)["w2"]
    self.assertEqual(float(jnp.abs(grad(1.0)).max()), 0.0)
    self.assertGreater(float(jnp.abs(grad(3.0)).max()), 1e-4)

  def test_scale_for_length_is_ceil(self):
    for length, want in [(1, 1), (16, 1), (17, 2), (32, 2), (33, 3), (1000, 63)]:
      self.assertEqual(float(clex.scale_for_length(length, 16)), want)


class ClexPositionsTest(absltest.TestCase):

  def test_positions_sorted_distinct_below_t_times_length_with_max_at_the_end(self):
    t_len, max_factor = 24, 4
    segments = np.ones((3, t_len), np.int32)
    segments[1, 10:] = 2
    segments[2, 18:] = 0  # padding
    positions = jnp.broadcast_to(jnp.arange(t_len, dtype=jnp.int32), (3, t_len))
    scales = []
    for seed in range(40):
      out = np.asarray(position_transforms.clex(positions, jnp.asarray(segments),
                                                jax.random.key(seed), max_factor=max_factor))
      real = segments != 0
      scale = (out[real].max() + 1) / t_len
      self.assertEqual(scale, int(scale))
      scales.append(int(scale))
      for row in range(3):
        self.assertEqual(out[row][real[row]].max(), scale * t_len - 1)
        for seg in set(segments[row][real[row]]):
          values = out[row][segments[row] == seg]
          self.assertTrue((np.diff(values) > 0).all(), values)
      np.testing.assert_array_equal(out[2, 18:], np.arange(18, 24))  # padding untouched
    self.assertEqual(set(scales), set(range(1, max_factor + 1)))


class ModelTest(parameterized.TestCase):

  @parameterized.parameters(("xpos", 1.0), ("xpos", 0.5), ("clex", 1.0))
  def test_prefill_equals_token_by_token_decode(self, kind, fraction):
    # original_length 8: prefill (l = 11) and a cache of 16 both give CLEX the scale t = 2.
    cfg = tiny_model_config(**{"posenc.kind": kind, "posenc.rotary_fraction": fraction,
                               "posenc.original_length": 8, "posenc.xpos_scale_base": 16.0,
                               "num_kv_heads": 2})
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    if kind == "clex":  # a trained-looking ODE, so that t = 2 differs from NTK
      params = jax.tree.map(lambda p: p + 0.1 * jnp.cos(jnp.arange(p.size).reshape(p.shape)),
                            params)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 11)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    decoded, _ = decode_one_by_one(graphdef, params, tokens, model.init_cache(2, 16))
    np.testing.assert_allclose(decoded, full, atol=TOLERANCE["float32"], rtol=0)

  def test_xpos_streaming_cache_runs(self):
    cfg = tiny_model_config(**{"posenc.kind": "xpos", "attention.window": 4,
                               "attention.sink_tokens": 2})
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (1, 9)), jnp.int32)
    decoded, _ = decode_one_by_one(graphdef, params, tokens, model.init_cache(1, 16))
    self.assertTrue(np.isfinite(decoded).all())

  @parameterized.parameters("xpos", "clex")
  def test_trains(self, kind):
    overrides = {"model.posenc.kind": kind, "model.posenc.original_length": 24}
    if kind == "clex":
      overrides["model.posenc.train_positions"] = "clex"
    losses, initial, final = train_on_counting(overrides, length=24)
    self.assertTrue(np.isfinite(losses).all(), losses)
    self.assertLess(np.mean(losses[-3:]), losses[0] - 0.3, losses)
    if kind == "clex":  # sampled scales t > 1 train the ODE's output layer away from 0
      w2 = final["groups"][0]["mixer"]["positional"]["w2"]
      self.assertGreater(float(jnp.abs(w2).max()), 1e-4)
      del initial


if __name__ == "__main__":
  absltest.main()
