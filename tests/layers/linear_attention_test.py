"""The `linear` mixer in a model: prefill == token-by-token decode through its constant-size
state (alone and in a hybrid with softmax attention), packed documents == each alone, it trains,
and its config errors name the field."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax import experiment
from longjax import runs
from longjax.models.generate import generate
from longjax.layers import caches
from longjax.layers.linear_attention import LinearAttention
from longjax.models import build_model
from tests import testing
from tests.models.learned_bias_model_test import train_on_counting
from tests.models.lm_test import _forward
from tests.models.lm_test import decode_one_by_one
from tests.models.lm_test import tiny_model_config

ATOL = {"float32": 2e-5, "bfloat16": 5e-2}


class DecodeTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("elu1_normalized", "linear", {}),
      ("identity_unnormalized", "linear", {"linear.feature_map": "identity",
                                           "linear.normalize": False}),
      ("hybrid_with_attention", "linear,attention", {"linear.feature_map": "relu"}),
  )
  def test_prefill_equals_token_by_token_decode(self, mixers, overrides):
    cfg = tiny_model_config(mixers=mixers, **{"linear.chunk_size": 4, **overrides})
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 11)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    # A prompt of 5 in one call (chunked, from the empty state), then one token at a time.
    prefix, cache = _forward(graphdef, params, tokens[:, :5], None, model.init_cache(2, 16))
    rest, cache = decode_one_by_one(graphdef, params, tokens[:, 5:], cache)
    np.testing.assert_allclose(jnp.concatenate([prefix, rest], axis=1), full,
                               atol=ATOL["float32"], rtol=0)
    self.assertEqual(int(cache[0].end), 11)

  def test_state_is_constant_in_the_length(self):
    layer = LinearAttention(32, 4, 8, rngs=nnx.Rngs(0))
    short, long = layer.init_cache(2, 16), layer.init_cache(2, 1 << 20)
    self.assertIsInstance(short, caches.RecurrentState)
    self.assertEqual(short.state.shape, long.state.shape)
    self.assertEqual(short.state.shape, (2, 4, 8, 9))  # normalised: the z column
    self.assertEqual(short.state_bytes_per_sequence, 4 * 8 * 9 * 4)


class DocumentsTest(absltest.TestCase):

  def test_packed_documents_equal_each_document_alone(self):
    layer = LinearAttention(16, 2, 8, rngs=nnx.Rngs(1), chunk_size=4)
    rng = np.random.default_rng(0)
    docs = [jnp.asarray(rng.normal(size=(1, n, 16)), jnp.float32) for n in (5, 3, 6)]
    segment_ids = jnp.asarray([[0] * 5 + [1] * 3 + [2] * 6])
    positions = jnp.arange(14)[None]
    run = jax.jit(lambda x, segment_ids: layer(x, positions=positions[:, :x.shape[1]],
                                               segment_ids=segment_ids)[0])
    packed = run(jnp.concatenate(docs, axis=1), segment_ids)
    alone = [run(d, None) for d in docs]
    np.testing.assert_allclose(packed, jnp.concatenate(alone, axis=1), atol=2e-5, rtol=2e-5)


class TrainTest(absltest.TestCase):

  def test_loss_finite_and_falling_alone_and_hybrid(self):
    for mixers in ("linear", "linear,attention"):
      losses, _, _ = train_on_counting({"model.mixers": mixers, "model.num_layers": 2},
                                       length=24)
      self.assertTrue(np.isfinite(losses).all(), (mixers, losses))
      self.assertLess(np.mean(losses[-3:]), losses[0] - 0.3, (mixers, losses))


class QuickstartTest(absltest.TestCase):

  def test_trains_evaluates_and_generates(self):
    # The quickstart (tiny) with --config.model.mixers=linear --config.train.steps=8, in-process.
    workdir = self.create_tempdir().full_path + "/run"
    cfg = testing.tiny_config(**{"model.mixers": "linear", "train.steps": 8})
    result = experiment.train_and_evaluate(cfg, workdir, progress=False)
    self.assertFalse(result.interrupted)
    run = runs.load_run(workdir)
    prompt = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 5)), jnp.int32)
    tokens = generate(run.graphdef, run.params, prompt, jax.random.key(0), max_new_tokens=6)
    # Greedy decoding through the state picks what a full forward pass ranks first (up to ties
    # within rounding).
    logits, _ = _forward(run.graphdef, run.params, tokens[:, :-1])
    logits = np.asarray(logits[:, 4:])
    picked = np.take_along_axis(logits, np.asarray(tokens[:, 5:, None]), axis=-1)[..., 0]
    np.testing.assert_allclose(picked, logits.max(axis=-1), atol=1e-4, rtol=0)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("unknown_feature_map", {"model.linear.feature_map": "cos"},
       r"model\.linear\.feature_map='cos': unknown choice \(valid: elu1, identity, relu\)"),
      ("normalized_identity", {"model.linear.feature_map": "identity"},
       r"model\.linear\.normalize=True: needs a non-negative feature map"),
      ("unknown_impl", {"model.linear.impl": "flash"},
       r"model\.linear\.impl='flash': unknown choice \(valid: auto, .*chunked"),
      ("negative_chunk", {"model.linear.chunk_size": -1},
       r"model\.linear\.chunk_size=-1: must be >= 0"),
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
