"""The `linear` mixer's own options: the unnormalised identity-map variant decodes like its
prefill, and its config errors name the field (the contract every recurrent mixer meets is
tests/layers/recurrent_mixers_test.py)."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax.layers.linear_attention import LinearAttention
from longjax.models import build_model
from tests import testing
from tests.models.lm_test import _forward
from tests.models.lm_test import decode_one_by_one
from tests.models.lm_test import tiny_model_config


class VariantTest(absltest.TestCase):

  def test_unnormalized_identity_map_prefill_equals_decode(self):
    cfg = tiny_model_config(mixers="linear", **{"linear.feature_map": "identity",
                                                "linear.normalize": False})
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 7)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    decoded, cache = decode_one_by_one(graphdef, params, tokens, model.init_cache(2, 8))
    np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=0)
    self.assertEqual(cache[0].state.shape, (2, 4, 8, 8))  # no normaliser column

  def test_based_taylor_map_prefill_equals_decode(self):
    # Based's linear attention: q, k projected to F=4 features, 1 + 4 + 16 Taylor features.
    cfg = tiny_model_config(mixers="linear", **{"linear.feature_map": "taylor2",
                                                "linear.feature_dim": 4})
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 50, (2, 7)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    decoded, cache = decode_one_by_one(graphdef, params, tokens, model.init_cache(2, 8))
    np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=0)
    self.assertEqual(cache[0].state.shape, (2, 4, 21, 9))

  def test_normalized_state_has_the_normalizer_column(self):
    layer = LinearAttention(32, 4, 8, rngs=nnx.Rngs(0))
    cache = layer.init_cache(2, 16)
    self.assertEqual(cache.state.shape, (2, 4, 8, 9))
    self.assertEqual(cache.state_bytes_per_sequence, 4 * 8 * 9 * 4)


class HedgehogTest(absltest.TestCase):

  def test_layer_equals_softmax_features_written_out(self):
    layer = LinearAttention(16, 2, 8, feature_map="hedgehog", feature_dim=4, chunk_size=4,
                            rngs=nnx.Rngs(0))
    # Move the maps away from their identity init, so that W and b are exercised.
    rng = np.random.default_rng(1)
    layer.feature_weight.value = jnp.asarray(rng.normal(size=(2, 2, 4, 4)), jnp.float32)
    layer.feature_bias.value = jnp.asarray(rng.normal(size=(2, 2, 4)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(1, 9, 16)), jnp.float32)
    y, _ = layer(x, positions=jnp.arange(9)[None])

    def softmax(z):
      e = np.exp(z - z.max())
      return e / e.sum()

    w_qk, w_v, w_out, fw, fb = (np.asarray(p.value, np.float64) for p in (
        layer.w_qk, layer.w_v, layer.w_out, layer.feature_weight, layer.feature_bias))
    x64 = np.asarray(x, np.float64)[0]
    want = np.zeros((9, 16))
    for n in range(2):
      phi = [np.stack([np.concatenate([softmax(z), softmax(-z)]) for z in
                       (x64 @ w_qk[:, i, n]) @ fw[i, n] + fb[i, n]]) for i in (0, 1)]
      v = x64 @ w_v[:, n]
      for t in range(9):
        weights = phi[1][:t + 1] @ phi[0][t]
        want[t] += (weights @ v[:t + 1] / (weights.sum() + 1e-6)) @ w_out[n]
    np.testing.assert_allclose(y[0], want, atol=2e-5, rtol=2e-4)
    self.assertEqual(layer.init_cache(1, 8).state.shape, (1, 2, 8, 9))  # 2F features

  def test_prefill_equals_decode(self):
    cfg = tiny_model_config(mixers="linear", **{"linear.feature_map": "hedgehog"})
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 50, (2, 7)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    decoded, _ = decode_one_by_one(graphdef, params, tokens, model.init_cache(2, 8))
    np.testing.assert_allclose(decoded, full, atol=2e-5, rtol=0)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("unknown_feature_map", {"model.linear.feature_map": "cos"},
       r"model\.linear\.feature_map='cos': unknown choice "
       r"\(valid: elu1, hedgehog, identity, relu, taylor2\)"),
      ("normalized_identity", {"model.linear.feature_map": "identity"},
       r"model\.linear\.normalize=True: needs a non-negative feature map"),
      ("unknown_impl", {"model.linear.impl": "flash"},
       r"model\.linear\.impl='flash': unknown choice \(valid: auto, .*chunked"),
      ("negative_chunk", {"model.linear.chunk_size": -1},
       r"model\.linear\.chunk_size=-1: must be >= 0"),
      ("feature_dim_too_large", {"model.linear.feature_map": "taylor2",
                                 "model.linear.feature_dim": 65},
       r"model\.linear\.feature_dim=65: must be in 0\.\.64 for feature_map='taylor2'"),
      ("taylor2_on_a_wide_head", {"model.linear.feature_map": "taylor2", "model.width": 256,
                                  "model.num_heads": 2},
       r"model\.linear\.feature_dim=0: taylor2 on the head dim 128 would carry 16513"),
      ("option_it_does_not_have", {"model.mixers": "linear(window=8)"},
       r"model\.mixers=.*linear has no field 'window'"),
      ("per_layer_bad_value", {"model.mixers": "linear(feature_map=cos),attention"},
       r"model\.mixers\[0\]:linear\.feature_map='cos'"),
  )
  def test_one_line_errors(self, overrides, pattern):
    cfg = testing.tiny_config(**{"model.mixers": "linear", **overrides})
    with self.assertRaisesRegex(configuration.ConfigError, pattern):
      configuration.validate(cfg, 1)

  def test_valid_configs(self):
    for overrides in ({}, {"model.linear.feature_map": "identity", "model.linear.normalize": False},
                      {"model.mixers": "linear(feature_map=relu),attention"}):
      configuration.validate(testing.tiny_config(**{"model.mixers": "linear", **overrides}), 1)


if __name__ == "__main__":
  absltest.main()
