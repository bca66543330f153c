"""RoPE scalings and partial rotary against the papers' formulas, written out independently.

References are numpy loops over frequencies written from the published definitions (YaRN's
Eq. 17-22, Llama 3.1's `apply_scaling` pseudo-code, the NTK base change), not calls into
`longjax.posenc.rope_scaling`.
"""

import json
import math
import os

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from configs import quickstart
from longjax import configuration
from longjax import posenc
from longjax import runs
from longjax.layers.positional import RotaryPositions
from longjax.models import build_model
from longjax.training import state as state_lib
from tests import testing
from tests.models.lm_test import _forward
from tests.models.lm_test import decode_one_by_one

STATIC = ("none", "linear", "abf", "ntk", "yarn", "llama3", "giraffe_power", "giraffe_truncated")
ALL = STATIC + ("dynamic_ntk",)
# Giraffe's basis changes have their own hyperparameter besides the factor; these values make
# them the identity, so that "factor 1 is plain RoPE" is a statement about the factor alone.
NEUTRAL = {"giraffe_power": {"exponent": 0.0}, "giraffe_truncated": {"cutoff": 1e12}}


def frequencies(method, head_dim=16, *, theta=10_000.0, factor=1.0, original_length=64,
                length=None, **hyperparameters):
  inv_freq, attention_factor = posenc.scaled_rope_frequencies(
      method, head_dim, theta=theta, factor=factor, original_length=original_length,
      length=length, **hyperparameters)
  return np.asarray(inv_freq, np.float64), attention_factor


def plain_reference(head_dim, theta=10_000.0):
  return np.array([theta ** (-2.0 * i / head_dim) for i in range(head_dim // 2)])


def yarn_reference(head_dim, theta, s, length, alpha=1.0, beta=32.0):
  """Peng et al. 2023, Eq. 17-22: per-dimension ramp gamma(r), r = L / lambda_d."""
  out = []
  for d in range(head_dim // 2):
    theta_d = theta ** (-2.0 * d / head_dim)
    r = length / (2 * math.pi / theta_d)
    if r < alpha:
      gamma = 0.0
    elif r > beta:
      gamma = 1.0
    else:
      gamma = (r - alpha) / (beta - alpha)
    out.append((1 - gamma) * theta_d / s + gamma * theta_d)
  return np.array(out), 0.1 * math.log(s) + 1.0


def llama3_reference(head_dim, theta, s, old_len, low=1.0, high=4.0):
  """Llama 3.1's published scaling, branch by branch on the wavelength."""
  low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
  out = []
  for freq in plain_reference(head_dim, theta):
    wavelen = 2 * math.pi / freq
    if wavelen < high_freq_wavelen:
      out.append(freq)
    elif wavelen > low_freq_wavelen:
      out.append(freq / s)
    else:
      smooth = (old_len / wavelen - low) / (high - low)
      out.append((1 - smooth) * freq / s + smooth * freq)
  return np.array(out)


def ntk_reference(head_dim, theta, s):
  return plain_reference(head_dim, theta * s ** (head_dim / (head_dim - 2)))


def random(shape, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape), jnp.float32)


class FrequencyTest(parameterized.TestCase):

  @parameterized.parameters(*ALL)
  def test_factor_one_is_plain_rope(self, method):
    # (dynamic_ntk at a length within the original 64; beyond it see the next test.)
    inv_freq, attention_factor = frequencies(method, factor=1.0, length=50,
                                             **NEUTRAL.get(method, {}))
    np.testing.assert_allclose(inv_freq, plain_reference(16), rtol=1e-6)
    self.assertEqual(float(attention_factor), 1.0)
    # And the rotated queries/keys through the layer.
    x, pos = random((2, 5, 3, 16)), jnp.asarray([[0, 1, 7, 300, 999]] * 2)
    layer = RotaryPositions(16, 10_000.0, scaling=method, factor=1.0, original_length=1024,
                            hyperparameters=NEUTRAL.get(method))
    np.testing.assert_allclose(layer.rotate(x, pos),
                               posenc.apply_rope(x, pos, posenc.rope_inv_freq(16)), atol=1e-5)

  @parameterized.parameters(1.0, 4.0)
  def test_dynamic_ntk_is_plain_up_to_the_original_length(self, s):
    for length in (1, 33, 64):
      inv_freq, _ = frequencies("dynamic_ntk", factor=s, original_length=64, length=length)
      np.testing.assert_allclose(inv_freq, plain_reference(16), rtol=1e-6)
    # Beyond it: NTK with s' = s * l / L - (s - 1), also with the length traced under jit. In
    # this (Hugging Face / emozilla) formulation s = 1 is *not* plain RoPE beyond L: the ratio
    # l / L itself drives the scaling and s only steepens it.
    traced = jax.jit(lambda n: posenc.scaled_rope_frequencies(
        "dynamic_ntk", 16, theta=10_000.0, factor=s, original_length=64, length=n)[0])
    for length in (65, 128, 1000):
      expected = ntk_reference(16, 10_000.0, s * length / 64 - (s - 1))
      inv_freq, _ = frequencies("dynamic_ntk", factor=s, original_length=64, length=length)
      np.testing.assert_allclose(inv_freq, expected, rtol=1e-5)
      np.testing.assert_allclose(traced(jnp.int32(length)), expected, rtol=1e-5)

  @parameterized.parameters(2.0, 4.0, 8.0, 16.0)
  def test_yarn_matches_the_paper(self, s):
    expected, mscale = yarn_reference(128, 10_000.0, s, 4096)
    inv_freq, attention_factor = frequencies("yarn", 128, factor=s, original_length=4096)
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-6)
    self.assertAlmostEqual(attention_factor, mscale, places=12)
    # The settings exercise all three regimes of the ramp.
    plain = plain_reference(128)
    kept, divided = np.isclose(inv_freq, plain), np.isclose(inv_freq, plain / s)
    self.assertTrue(kept.any() and divided.any() and (~kept & ~divided).any())

  def test_yarn_attention_factor_values(self):
    # sqrt(1/t) = 0.1 ln(s) + 1, by hand.
    for s, expected in [(2.0, 1.0693147), (4.0, 1.1386294), (8.0, 1.2079442), (16.0, 1.2772589)]:
      self.assertAlmostEqual(frequencies("yarn", factor=s)[1], expected, places=6)
    self.assertEqual(frequencies("yarn", factor=0.5)[1], 1.0)  # no temperature when shrinking

  @parameterized.parameters(2.0, 4.0, 8.0)
  def test_llama3_matches_the_published_formula(self, s):
    expected = llama3_reference(128, 500_000.0, s, 8192)
    inv_freq, attention_factor = frequencies("llama3", 128, theta=500_000.0, factor=s,
                                             original_length=8192)
    np.testing.assert_allclose(inv_freq, expected, rtol=1e-6)
    self.assertEqual(attention_factor, 1.0)
    plain = plain_reference(128, 500_000.0)
    smooth = ~np.isclose(inv_freq, plain) & ~np.isclose(inv_freq, plain / s)
    self.assertGreater(smooth.sum(), 0)

  def test_llama3_defaults_are_llama_3_1(self):
    inv_freq, _ = posenc.rope_scaling.llama3(128)
    np.testing.assert_allclose(inv_freq, llama3_reference(128, 500_000.0, 8.0, 8192), rtol=1e-6)

  def test_ntk_closed_form(self):
    for s in (2.0, 8.0):
      inv_freq, _ = frequencies("ntk", 32, factor=s)
      np.testing.assert_allclose(inv_freq, ntk_reference(32, 10_000.0, s), rtol=1e-6)
      # NTK's defining property: the fastest frequency is kept, the slowest is interpolated.
      plain = plain_reference(32)
      self.assertAlmostEqual(inv_freq[0], plain[0])
      self.assertAlmostEqual(inv_freq[-1] / (plain[-1] / s), 1.0, places=5)

  def test_abf_and_giraffe_closed_forms(self):
    np.testing.assert_allclose(frequencies("abf", factor=50.0)[0], plain_reference(16, 500_000.0),
                               rtol=1e-6)
    np.testing.assert_allclose(frequencies("abf", factor=2.0, base=500_000.0)[0],
                               plain_reference(16, 500_000.0), rtol=1e-6)
    power = [10_000.0 ** (-2 * i / 16) / 2 * (1 - 2 * i / 16) ** 0.5 for i in range(8)]
    np.testing.assert_allclose(frequencies("giraffe_power", factor=2.0)[0], power, rtol=1e-6)
    # Truncated: keep frequencies turning at least once in L = 64 tokens (>= b = 2 pi / 64),
    # rho = b / 16 for those in [b / 8, b), 0 below.
    b = 2 * math.pi / 64
    expected = [f if f >= b else (b / 16 if f >= b / 8 else 0.0) for f in plain_reference(16)]
    got = frequencies("giraffe_truncated", factor=1.0, original_length=64)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    self.assertEqual(sorted(set(np.round(got / b, 6)) & {0.0, 0.0625}), [0.0, 0.0625])

  def test_errors_are_one_line(self):
    for call, pattern in [
        (lambda: frequencies("rope2"), r"unknown RoPE scaling 'rope2'; valid: none, linear"),
        (lambda: frequencies("linear", factor=0.0), "factor must be positive"),
        (lambda: frequencies("yarn", original_length=0), "original_length"),
        (lambda: frequencies("ntk", 2, factor=2.0), r"rotary dim > 2"),
        (lambda: frequencies("llama3", low_freq_factor=4.0), "must exceed"),
        (lambda: posenc.rotary_dim(16, 0.0), r"in \(0, 1\]"),
    ]:
      with self.assertRaisesRegex(ValueError, pattern) as ctx:
        call()
      self.assertNotIn("\n", str(ctx.exception))


class RotationTest(parameterized.TestCase):

  @parameterized.parameters(2.0, 5.0)
  def test_linear_at_p_is_plain_at_p_over_s(self, s):
    x, pos = random((1, 6, 2, 16)), jnp.asarray([[0, 3, 10, 77, 500, 1999]])
    layer = RotaryPositions(16, 10_000.0, scaling="linear", factor=s)
    np.testing.assert_allclose(layer.rotate(x, pos),
                               posenc.apply_rope(x, pos / s, posenc.rope_inv_freq(16)), atol=2e-4)

  @parameterized.parameters(*STATIC)
  def test_short_tables_are_a_prefix_of_long_ones(self, method):
    layer = RotaryPositions(16, 10_000.0, rotary_fraction=0.5, scaling=method, factor=4.0,
                            original_length=8)
    x, pos = random((1, 40, 2, 16)), jnp.arange(40)[None]
    np.testing.assert_allclose(layer.rotate(x[:, :9], pos[:, :9]), layer.rotate(x, pos)[:, :9],
                               atol=1e-6)
    inv_freq, _ = layer._frequencies(None)  # pylint: disable=protected-access
    for short, long in zip(posenc.rope_angles(pos[:, :9], inv_freq),
                           posenc.rope_angles(pos, inv_freq)):
      np.testing.assert_array_equal(short, long[:, :9])

  def test_dynamic_ntk_depends_on_the_length(self):
    # The counterpart of the prefix property: beyond L the rotation of a token depends on how
    # long the context is.
    layer = RotaryPositions(16, 10_000.0, scaling="dynamic_ntk", factor=4.0, original_length=8)
    x, pos = random((1, 40, 1, 16)), jnp.arange(40)[None]
    np.testing.assert_allclose(layer.rotate(x[:, :8], pos[:, :8]),
                               posenc.apply_rope(x[:, :8], pos[:, :8], posenc.rope_inv_freq(16)),
                               atol=1e-6)
    self.assertGreater(float(jnp.max(jnp.abs(layer.rotate(x[:, :9], pos[:, :9])
                                             - layer.rotate(x, pos)[:, :9]))), 1e-3)

  @parameterized.product(method=STATIC, fraction=(1.0, 0.5))
  def test_dot_product_depends_only_on_distance(self, method, fraction):
    layer = RotaryPositions(16, 10_000.0, rotary_fraction=fraction, scaling=method, factor=4.0,
                            original_length=16)
    q, k = random((1, 1, 1, 16), 1), random((1, 1, 1, 16), 2)

    def score(m, n):
      return float(jnp.sum(layer.rotate(q, jnp.array([[m]])) * layer.rotate(k, jnp.array([[n]]))))

    for m, n, shift in [(5, 2, 100), (0, 0, 37), (3, 9, 1000)]:
      self.assertAlmostEqual(score(m, n), score(m + shift, n + shift), delta=1e-3)

  @parameterized.parameters((0.25, 4), (0.5, 8), (1.0, 16))
  def test_partial_rotary(self, fraction, rotated):
    self.assertEqual(posenc.rotary_dim(16, fraction), rotated)
    x, pos = random((2, 5, 3, 16)), jnp.asarray([[0, 1, 7, 300, 999]] * 2)
    got = RotaryPositions(16, 10_000.0, rotary_fraction=fraction).rotate(x, pos)
    np.testing.assert_array_equal(got[..., rotated:], x[..., rotated:])  # untouched, bitwise
    np.testing.assert_allclose(got[..., :rotated], posenc.apply_rope(
        x[..., :rotated], pos, posenc.rope_inv_freq(rotated)), atol=2e-5)

  def test_rotary_dim_rounding(self):
    # round(fraction * H / 2) * 2: GPT-NeoX's 0.25 of 64 rotates 16, 0.3 of 16 rotates 4 (2.4
    # pairs round to 2), 0.45 of 10 rotates 4 (2.25 pairs).
    self.assertEqual([posenc.rotary_dim(h, f) for h, f in [(64, 0.25), (16, 0.3), (10, 0.45)]],
                     [16, 4, 4])
    with self.assertRaisesRegex(ValueError, "rotates no feature pair"):
      posenc.rotary_dim(16, 0.05)

  def test_yarn_scales_queries_and_keys(self):
    # The paper scales both rotated q and k by sqrt(1/t) = 0.1 ln(s) + 1: logits by its square.
    x, pos = random((1, 4, 2, 16)), jnp.asarray([[0, 5, 60, 700]])
    layer = RotaryPositions(16, 10_000.0, scaling="yarn", factor=8.0, original_length=64)
    inv_freq, _ = yarn_reference(16, 10_000.0, 8.0, 64)
    expected = posenc.apply_rope(x, pos, jnp.asarray(inv_freq, jnp.float32))
    np.testing.assert_allclose(layer.rotate(x, pos), expected * (0.1 * math.log(8.0) + 1.0),
                               rtol=1e-5, atol=1e-5)


def tiny_model_config(**posenc_overrides):
  c = quickstart.get_config("tiny").model
  c.num_layers, c.width, c.num_heads, c.mlp_hidden = 1, 32, 2, 48
  return testing.apply_overrides(c, {f"posenc.{k}": v for k, v in posenc_overrides.items()})




class ModelTest(parameterized.TestCase):

  @parameterized.parameters(*[(m, 1.0) for m in ALL] + [("yarn", 0.5), ("dynamic_ntk", 0.5)])
  def test_prefill_equals_token_by_token_decode(self, method, fraction):
    # original_length 4 < 10 tokens, so every scaling is active (dynamic NTK included: it is
    # computed for the cache capacity, 10, when decoding and for 10 positions in the prefill).
    cfg = tiny_model_config(scaling=method, factor=4.0, original_length=4,
                            rotary_fraction=fraction)
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 10)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    decoded, _ = decode_one_by_one(graphdef, params, tokens, model.init_cache(2, 10))
    np.testing.assert_allclose(decoded, full, atol=5e-5, rtol=0)

  def test_scalings_keep_parameter_shapes(self):
    # Training-free: a trained RoPE checkpoint restores under any scaling.
    def shapes(**overrides):
      _, abstract = state_lib.model_graphdef(tiny_model_config(**overrides), 50)
      return jax.tree.map(lambda a: a.shape, abstract.to_pure_dict())

    plain = shapes()
    for method in ALL:
      self.assertEqual(shapes(scaling=method, factor=8.0, original_length=32), plain, method)
    self.assertEqual(shapes(rotary_fraction=0.25), plain)


# (posenc overrides, field named in the message, a fragment of the message)
BAD_VALUES = [
    ({"scaling": "pi"}, "model.posenc.scaling", "valid: abf, dynamic_ntk, giraffe_power"),
    ({"kind": "alibi", "scaling": "yarn"}, "model.posenc.scaling",
     "rescales RoPE, but model.posenc.kind='alibi'"),
    ({"factor": 0.0}, "model.posenc.factor", "must be positive"),
    ({"factor": -2.0, "scaling": "linear"}, "model.posenc.factor", "must be positive"),
    ({"rotary_fraction": 0.0}, "model.posenc.rotary_fraction", "must be in (0, 1]"),
    ({"rotary_fraction": 1.5}, "model.posenc.rotary_fraction", "must be in (0, 1]"),
    ({"rotary_fraction": 0.01}, "model.posenc.rotary_fraction", "rotates no feature pair"),
    ({"scaling": "yarn", "original_length": 0}, "model.posenc.original_length",
     "needs the training length"),
    ({"original_length": -1}, "model.posenc.original_length", "must be >= 0"),
    ({"scaling": "yarn", "original_length": 32, "yarn_beta_fast": 0.5}, "model.posenc.scaling",
     "beta_fast=0.5 must exceed beta_slow=1.0"),
]


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(*BAD_VALUES)
  def test_bad_value_names_field_value_and_choices(self, overrides, field, fragment):
    with self.assertRaises(configuration.ConfigError) as ctx:
      configuration.validate_model(tiny_model_config(**overrides))
    message = str(ctx.exception)
    self.assertTrue(message.startswith(field), message)
    self.assertIn(fragment, message)
    self.assertNotIn("\n", message)

  def test_every_scaling_validates_with_defaults(self):
    for method in ALL:
      configuration.validate_model(tiny_model_config(scaling=method, factor=8.0,
                                                     original_length=32))

  def test_saved_run_resolves_original_length_to_its_training_length(self):
    workdir = self.create_tempdir().full_path
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump({"data": {"seq_len": 48}}, f)  # a run saved before the field existed
    self.assertEqual(runs.saved_config(workdir).model.posenc.original_length, 48)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump({"data": {"seq_len": 48}, "model": {"posenc": {"original_length": 100}}}, f)
    self.assertEqual(runs.saved_config(workdir).model.posenc.original_length, 100)


if __name__ == "__main__":
  absltest.main()
