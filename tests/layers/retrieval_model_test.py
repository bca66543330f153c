"""Retrieval policies through the model: prefill == token-by-token decoding for every policy,
a cache in host memory (with and without the LRU of hot blocks) == the on-device cache, a window
covering the sequence == full attention, DuoAttention's extreme splits against LM-Infinite and
TokenSelect, evaluation through the cache, and the config errors.

Tolerances: float32, 1e-4 absolute on logits (1e-6 where the same arithmetic runs elsewhere).
"""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax.models import build_model
from longjax.training import step as step_lib
from tests.models.lm_test import _forward
from tests.models.lm_test import decode_one_by_one
from tests.models.lm_test import tiny_model_config


def _model_config(policy, **overrides):
  fields = {"posenc.kind": "rope", "num_kv_heads": 2, "attention.retrieval": policy,
            "attention.retrieval_top_k": 8, "attention.retrieval_window": 8,
            "attention.retrieval_sinks": 4, "attention.retrieval_block": 4,
            "attention.retrieval_chunk": 8}
  fields.update({f"attention.{k}": v for k, v in overrides.items()})
  cfg = tiny_model_config(**fields)
  configuration.validate_model(cfg)
  return cfg


class DuoModelTest(absltest.TestCase):

  def test_only_streaming_heads_is_lm_infinite(self):
    """Every head streaming: sinks + window with far sinks at the window's distance, which is
    the LM-Infinite attention of the training path (no cache)."""
    fields = {"posenc.kind": "rope", "num_kv_heads": 2}
    model = build_model(tiny_model_config(**fields, **{
        "attention.window": 8, "attention.sink_tokens": 4, "attention.distance_ceiling": 8}),
                        vocab_size=50, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    streaming = build_model(_model_config("duo", retrieval_head_split="0:;1:"), vocab_size=50,
                            rngs=nnx.Rngs(3))
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 50, (1, 30)), jnp.int32)
    expected, _ = _forward(graphdef, params, tokens)
    got, cache = _forward(nnx.graphdef(streaming), params, tokens, None,
                          streaming.init_cache(1, 32))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    self.assertEqual([c.k.shape[2] for c in cache], [0, 0])  # no head keeps the whole cache

  def test_every_head_retrieving_is_capped_full_attention(self):
    """No split: every head keeps the cache, which is TokenSelect selecting everything."""
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, 50, (1, 30)), jnp.int32)
    outs = []
    for policy, fields in (("duo", {}),
                           ("tokenselect", {"retrieval_top_k": 32, "retrieval_reuse": 2.0})):
      model = build_model(_model_config(policy, **fields), vocab_size=50, rngs=nnx.Rngs(4))
      outs.append(_forward(*nnx.split(model), tokens, None, model.init_cache(1, 32))[0])
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)


class ModelTest(parameterized.TestCase):

  @parameterized.parameters(("infllm", {}), ("tokenselect", {"retrieval_reuse": 0.2}),
                            ("hip", {"retrieval_top_k": 4}),
                            ("duo", {"retrieval_head_split": "0:1;1:0,1"}))
  def test_prefill_equals_token_by_token_decode(self, policy, overrides):
    model = build_model(_model_config(policy, **overrides), vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 29)), jnp.int32)
    prefilled, _ = _forward(graphdef, params, tokens, None, model.init_cache(2, 32))
    decoded, _ = decode_one_by_one(graphdef, params, tokens, model.init_cache(2, 32))
    np.testing.assert_allclose(prefilled, decoded, atol=1e-4)

  # HiP here (its pruning reads center keys from host memory too), InfLLM through the LRU
  # below (its block keys are scored from host memory).
  def test_a_cache_in_host_memory_gives_the_same_logits(self, policy="hip"):
    """retrieval_cache='host': keys and values stay in host memory, the blocks a step reads
    are gathered there and copied over; prefill and decode equal the on-device cache's."""
    tokens = jnp.asarray(np.random.RandomState(5).randint(0, 50, (2, 27)), jnp.int32)
    outs = []
    for placement in ("device", "host"):
      model = build_model(_model_config(policy, retrieval_cache=placement), vocab_size=50,
                          rngs=nnx.Rngs(5))
      graphdef, params = nnx.split(model)
      prefilled, cache = _forward(graphdef, params, tokens[:, :20], None,
                                  model.init_cache(2, 32))
      decoded, cache = decode_one_by_one(graphdef, params, tokens[:, 20:], cache)
      outs.append(jnp.concatenate([prefilled, decoded], axis=1))
      self.assertEqual(cache[0].k.sharding.memory_kind,
                       "pinned_host" if placement == "host" else "device")
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-6)

  def test_a_device_lru_of_hot_blocks_gives_the_same_logits(self, policy="infllm"):
    """retrieval_hot_blocks: decode steps read their blocks from a device LRU and copy only
    when one is missing; the logits equal the on-device cache's, and fewer blocks are copied
    than selected."""
    tokens = jnp.asarray(np.random.RandomState(6).randint(0, 50, (1, 60)), jnp.int32)
    outs = []
    for fields in ({}, {"retrieval_cache": "host", "retrieval_hot_blocks": 4}):
      model = build_model(_model_config(policy, **fields), vocab_size=50, rngs=nnx.Rngs(6))
      graphdef, params = nnx.split(model)
      prefilled, cache = _forward(graphdef, params, tokens[:, :20], None,
                                  model.init_cache(1, 64))
      decoded, cache = decode_one_by_one(graphdef, params, tokens[:, 20:], cache)
      outs.append(jnp.concatenate([prefilled, decoded], axis=1))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-6)
    copied = int(cache[0].policy["copied_blocks"][0])
    self.assertGreater(copied, 0)
    self.assertLess(copied, 40 * 2)  # 40 steps selecting 2 blocks each

  @parameterized.parameters("infllm", "tokenselect")
  def test_window_over_the_whole_sequence_is_full_attention(self, policy):
    model = build_model(_model_config(policy, retrieval_window=32), vocab_size=50,
                        rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 50, (1, 30)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    cached, _ = _forward(graphdef, params, tokens, None, model.init_cache(1, 32))
    np.testing.assert_allclose(cached, full, atol=1e-4)

  def test_evaluation_runs_through_the_cache(self):
    model = build_model(_model_config("infllm"), vocab_size=50, rngs=nnx.Rngs(2))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 50, (1, 25)), jnp.int32)
    losses = step_lib.token_losses(graphdef, params, tokens)
    logits, _ = model(tokens[:, :-1], cache=model.init_cache(1, 24))
    expected = -jax.nn.log_softmax(logits)[0, jnp.arange(24), tokens[0, 1:]]
    np.testing.assert_allclose(losses[0], expected, atol=1e-4)
    self.assertGreater(model.init_cache(1, 4096)[0].state_bytes_per_sequence,
                       model.init_cache(1, 1024)[0].state_bytes_per_sequence)


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      ({"retrieval": "quest"}, "model.attention.retrieval"),
      ({"retrieval_top_k": 0}, "model.attention.retrieval_top_k"),
      ({"retrieval_top_k": 6}, "model.attention.retrieval_top_k"),  # not whole blocks
      ({"retrieval_sinks": 2}, "model.attention.retrieval_sinks"),
      ({"retrieval_representatives": 5}, "model.attention.retrieval_representatives"),
      ({"window": 16}, "model.attention.window"),
      ({"normalizer": "softplus"}, "model.attention.retrieval"),
      ({"retrieval_cache": "disk"}, "model.attention.retrieval_cache"),
      ({"retrieval_hot_blocks": 4}, "model.attention.retrieval_hot_blocks"),  # not "host"
      ({"retrieval_cache": "host", "retrieval_hot_blocks": 1},
       "model.attention.retrieval_hot_blocks"),  # fewer than the 2 blocks a step selects
      ({"retrieval": "tokenselect", "retrieval_cache": "host"},
       "model.attention.retrieval_cache"),
      ({"retrieval": "duo", "retrieval_heads": 0.0}, "model.attention.retrieval_heads"),
      ({"retrieval": "duo", "retrieval_head_split": "0:1,1"},
       "model.attention.retrieval_head_split"),
      ({"retrieval": "duo", "retrieval_head_split": "2:0"},
       "model.attention.retrieval_head_split"),
      ({"retrieval": "duo", "retrieval_head_split": "0:5"},
       "model.attention.retrieval_head_split"),
      ({"retrieval": "duo", "retrieval_head_split": "zero"},
       "model.attention.retrieval_head_split"),
  )
  def test_bad_fields_name_the_field(self, overrides, field):
    with self.assertRaisesRegex(configuration.ConfigError, field):
      _model_config("infllm", **overrides)

  def test_a_logit_bias_encoding_is_refused(self):
    cfg = tiny_model_config(**{"posenc.kind": "alibi", "attention.retrieval": "tokenselect"})
    with self.assertRaisesRegex(configuration.ConfigError, "model.posenc.kind"):
      configuration.validate_model(cfg)

  def test_a_model_without_attention_layers_is_refused(self):
    cfg = tiny_model_config(**{"mixers": "retnet", "attention.retrieval": "infllm"})
    with self.assertRaisesRegex(configuration.ConfigError, "has none"):
      configuration.validate_model(cfg)

  def test_one_layer_of_the_pattern_may_retrieve(self):
    cfg = tiny_model_config(**{"mixers": "attention(retrieval=tokenselect),attention",
                               "posenc.kind": "rope"})
    configuration.validate_model(cfg)
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    kinds = [type(c).__name__ for c in model.init_cache(1, 8)]
    self.assertEqual(kinds, ["RetrievalCache", "KVCache"])
    self.assertTrue(model.evaluates_with_cache)


if __name__ == "__main__":
  absltest.main()
