"""Training-free retrieval policies (InfLLM, TokenSelect) on the shared mechanism.

The mechanism against a float64 numpy attention written from its definition (window keys at
their true distances, sinks and selected keys at distance `window`), with every candidate
selected; with nothing selected against LM-Infinite's decode path; InfLLM's representative
scores against a numpy double loop; each policy's selection on hand-made keys (the block or
token holding the only matching key is chosen; TokenSelect's selection cache reuses exactly
when consecutive queries are similar); then the model: prefill == token-by-token decoding,
a window covering the sequence == full attention, evaluation through the cache, config errors.

Tolerances: float32 throughout, 2e-5 absolute on O(1) outputs.
"""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax import posenc
from longjax.layers import lm_infinite
from longjax.layers import retrieval as retrieval_layer
from longjax.models import build_model
from longjax.ops import retrieval
from longjax.ops import retrieval_policies as policies
from longjax.training import step as step_lib
from tests.models.lm_test import _forward
from tests.models.lm_test import decode_one_by_one
from tests.models.lm_test import tiny_model_config

ATOL = 2e-5
H = 8
INV_FREQ = posenc.rope_inv_freq(H, 100.0)


def _rope(x, positions, is_key):
  del is_key
  return posenc.apply_rope(x, positions, INV_FREQ)


def _no_rotation(x, positions, is_key):
  del positions, is_key
  return x


class _Rope:
  """The `AttentionPositions` interface over `_rope`, for the LM-Infinite path."""

  def rotate(self, x, positions, *, context_length=None, is_key=False):
    del context_length
    return _rope(x, positions, is_key)

  def bias(self, q_positions, kv_positions):
    del q_positions, kv_positions


def _qkv(b, t, n, k, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((b, t, n, H), (b, t, k, H), (b, t, k, H)))


def _numpy_capped(q, k, v, *, window, align):
  """Every key j <= t: at its true distance when lo(t) <= j, else at distance `window`."""
  b_, t_, n, _ = q.shape
  group = n // k.shape[2]
  index = jnp.arange(t_)
  rot = lambda x, p: np.asarray(_rope(x, jnp.broadcast_to(p, x.shape[:2]), False), np.float64)
  q_true, q_far = rot(q, index), rot(q, jnp.full((t_,), window))
  k_true, k_far = rot(k, index), rot(k, jnp.zeros((t_,), jnp.int32))
  out = np.zeros(q.shape)
  for b in range(b_):
    for i in range(t_):
      lo = max(i + 1 - window, 0) // align * align
      for head in range(n):
        kv = head // group
        x = np.array([(q_true[b, i, head] @ k_true[b, j, kv]) if j >= lo
                      else (q_far[b, i, head] @ k_far[b, j, kv]) for j in range(i + 1)])
        p = np.exp(x / np.sqrt(H) - np.max(x / np.sqrt(H)))
        out[b, i, head] = (p / p.sum()) @ np.asarray(v[b, :i + 1, kv], np.float64)
  return out


class MechanismTest(parameterized.TestCase):

  @parameterized.parameters(
      ("tokenselect", 0, 5), ("tokenselect", 3, 16), ("infllm", 0, 5), ("infllm", 4, 16))
  def test_every_candidate_selected_equals_capped_attention(self, policy, sinks, chunk):
    b, t, n, kv, window, block = 2, 21, 4, 2, 6, 4
    q, k, v = _qkv(b, t, n, kv)
    if policy == "infllm":
      reps = jnp.asarray(np.random.default_rng(1).normal(size=(b, kv, 6, 2, H)), jnp.float32)
      pad = [(0, 0), (0, 24 - t), (0, 0), (0, 0)]
      k, v = jnp.pad(k, pad), jnp.pad(v, pad)  # whole blocks
      select = policies.infllm_select(reps, top_blocks=6, block=block, sinks=sinks,
                                      window=window)
      state, align = None, block
    else:
      select = policies.tokenselect_select(k, top_k=t, sinks=sinks, window=window,
                                           reuse_threshold=2.0, scale=H ** -0.5)
      state = (jnp.zeros((b, n, H)), jnp.full((b, t), -1, jnp.int32), jnp.asarray(False))
      align = 1
    out, _ = retrieval.retrieval_attention(
        q, k, v, jnp.arange(t), window=window, sinks=sinks, align=align, select=select,
        select_state=state, rotate=_rope, chunk=chunk)
    expected = _numpy_capped(q, k[:, :t], v[:, :t], window=window, align=align)
    np.testing.assert_allclose(out, expected, atol=ATOL)

  def test_nothing_selected_equals_lm_infinite(self):
    """Sinks + window alone is LM-Infinite with its ceiling at the window."""
    b, t, n, kv, window, sinks = 1, 19, 4, 2, 5, 3
    q, k, v = _qkv(b, t, n, kv, seed=2)
    out, _ = retrieval.retrieval_attention(q, k, v, jnp.arange(t), window=window, sinks=sinks,
                                           align=1, select=None, rotate=_rope, chunk=8)
    expected = lm_infinite.lm_infinite_attention(
        q, k, v, jnp.broadcast_to(jnp.arange(t), (b, t)), segment_ids=None, window=window,
        global_tokens=sinks, ceiling=window, positional=_Rope(), scale_queries=lambda q, p: q,
        impl="reference", block_size=None)
    np.testing.assert_allclose(out, expected, atol=ATOL)


class InfLLMTest(absltest.TestCase):

  def test_scores_sum_the_window_queries_logits(self):
    b, t, n, kv, window = 1, 13, 4, 2, 4
    q, k, _ = _qkv(b, t, n, kv, seed=3)
    scores = jnp.zeros((b, kv, t))
    for part in (slice(0, 6), slice(6, t)):  # two calls add up to one
      scores = policies.accumulate_scores(scores, q[:, part], k, jnp.arange(t)[part],
                                          window=window, rotate=_rope, chunk=4)
    index = jnp.arange(t)
    qr = np.asarray(_rope(q, index[None], False), np.float64)
    kr = np.asarray(_rope(k, index[None], True), np.float64)
    expected = np.zeros((kv, t))
    for m in range(t):
      for i in range(m, min(m + window, t)):
        for head in range(n):
          expected[head // 2, m] += qr[0, i, head] @ kr[0, m, head // 2]
    np.testing.assert_allclose(scores[0], expected, atol=1e-4)

  def test_representatives_are_the_best_scored_keys_of_finished_blocks(self):
    b, kv, s, block, window = 1, 1, 12, 4, 3
    k = jnp.arange(s, dtype=jnp.float32)[None, :, None, None] * jnp.ones((b, s, kv, 2))
    scores = jnp.asarray([[[0, 5, 1, 2, 9, 0, 0, 8, 3, 3, 3, 3]]], jnp.float32)
    reps = jnp.full((b, kv, 3, 2, 2), -1.0)
    # After 10 tokens the blocks with (g + 1) * 4 <= 10 + 1 - 3 are done: blocks 0 and 1.
    reps = policies.freeze_representatives(reps, scores, k, jnp.asarray(0), jnp.asarray(10),
                                           window=window, block=block, new_tokens=10)
    self.assertEqual(sorted(reps[0, 0, 0, :, 0].tolist()), [1.0, 3.0])  # scores 5, 2
    self.assertEqual(sorted(reps[0, 0, 1, :, 0].tolist()), [4.0, 7.0])  # scores 9, 8
    self.assertTrue(np.all(reps[0, 0, 2] == -1))  # block 2 is still in a window

  def test_the_block_holding_the_matching_key_is_retrieved(self):
    """Queries all along u; only key 13 (block 3) points along u: InfLLM's representative
    scores pick it for block 3, and a query along u retrieves block 3."""
    b, n, kv, window, block, t = 1, 2, 1, 4, 4, 28
    rng = np.random.default_rng(4)
    u = np.eye(H)[0]
    k = 0.1 * rng.normal(size=(b, t, kv, H))
    k[0, 13, 0] = 5 * u
    q = np.broadcast_to(u, (b, t, n, H))
    policy = retrieval_layer.RetrievalPolicy("infllm", top_k=4, window=window, sinks=0,
                                             block=block, representatives=1, reuse=0.9, chunk=8)
    cache = retrieval_layer.init_cache(policy, b, t, n, kv, H, jnp.float32)
    _, cache = retrieval_layer.retrieval_decode(
        jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.zeros((b, t, kv, H)),
        cache, policy, rotate=_no_rotation)
    self.assertEqual(cache.policy["representatives"][0, 0, 3, 0].tolist(), k[0, 13, 0].tolist())
    select = policies.infllm_select(cache.policy["representatives"], top_blocks=1,
                                    block=block, sinks=0, window=window)
    (ids, valid), _ = select(None, jnp.asarray(q[:, -1:]), jnp.asarray([t - 1]),
                             jnp.ones(1, bool))
    self.assertEqual(ids[0, 0, 0].tolist(), [12, 13, 14, 15])
    self.assertTrue(np.all(valid))


class TokenSelectTest(absltest.TestCase):

  def _select(self, k, threshold, top_k=1):
    return policies.tokenselect_select(k, top_k=top_k, sinks=1, window=2,
                                       reuse_threshold=threshold, scale=H ** -0.5)

  def test_the_matching_token_is_selected_and_sinks_and_window_are_not(self):
    s = 10
    k = 0.1 * np.random.default_rng(5).normal(size=(1, s, 1, H))
    u = np.eye(H)[1]
    k[0, 4, 0] = 5 * u
    k[0, 0, 0] = k[0, 8, 0] = 9 * u  # a sink and a window key: never candidates
    q = jnp.asarray(np.broadcast_to(u, (1, 1, 2, H)), jnp.float32)
    state = (jnp.zeros((1, 2, H)), jnp.full((1, 1), -1, jnp.int32), jnp.asarray(False))
    (ids, valid), _ = self._select(jnp.asarray(k, jnp.float32), 2.0)(
        state, q, jnp.asarray([9]), jnp.ones(1, bool))
    self.assertEqual(ids[0, 0, 0].tolist(), [4])
    self.assertTrue(bool(valid[0, 0, 0, 0]))

  def test_the_selection_cache_reuses_while_queries_stay_similar(self):
    s = 12
    k = jnp.asarray(np.random.default_rng(6).normal(size=(1, s, 1, H)), jnp.float32)
    e = np.eye(H)
    # Queries u, u, w, w + tiny: the 2nd reuses the cached selection, the 4th the 3rd's.
    q = np.stack([e[0], e[0], e[3], e[3] + 0.01 * e[5]])[None, :, None].repeat(2, axis=2)
    q = jnp.asarray(q, jnp.float32)
    index = jnp.arange(8, 12)
    cached = (jnp.asarray(np.broadcast_to(e[0], (1, 2, H)), jnp.float32),
              jnp.asarray([[0, 1]], jnp.int32), jnp.asarray(True))
    live = jnp.ones(4, bool)
    (fresh, _), _ = self._select(k, 2.0, top_k=2)(cached, q, index, live)
    (ids, _), (last_q, last_ids, _) = self._select(k, 0.9, top_k=2)(cached, q, index, live)
    np.testing.assert_array_equal(ids[0, 0, 0], [0, 1])
    np.testing.assert_array_equal(ids[0, 1, 0], [0, 1])
    np.testing.assert_array_equal(ids[0, 2, 0], fresh[0, 2, 0])
    np.testing.assert_array_equal(ids[0, 3, 0], fresh[0, 2, 0])
    np.testing.assert_array_equal(last_ids[0], fresh[0, 2, 0])
    np.testing.assert_allclose(last_q[0], q[0, 3])


def _model_config(policy, **overrides):
  fields = {"posenc.kind": "rope", "num_kv_heads": 2, "attention.retrieval": policy,
            "attention.retrieval_top_k": 8, "attention.retrieval_window": 8,
            "attention.retrieval_sinks": 4, "attention.retrieval_block": 4,
            "attention.retrieval_chunk": 8}
  fields.update({f"attention.{k}": v for k, v in overrides.items()})
  cfg = tiny_model_config(**fields)
  configuration.validate_model(cfg)
  return cfg


class ModelTest(parameterized.TestCase):

  @parameterized.parameters(("infllm", {}), ("tokenselect", {"retrieval_reuse": 0.2}))
  def test_prefill_equals_token_by_token_decode(self, policy, overrides):
    model = build_model(_model_config(policy, **overrides), vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 29)), jnp.int32)
    prefilled, _ = _forward(graphdef, params, tokens, None, model.init_cache(2, 32))
    decoded, _ = decode_one_by_one(graphdef, params, tokens, model.init_cache(2, 32))
    np.testing.assert_allclose(prefilled, decoded, atol=1e-4)
    # Split prefill: the cache carries the policy's state across calls.
    first, cache = _forward(graphdef, params, tokens[:, :13], None, model.init_cache(2, 32))
    second, _ = _forward(graphdef, params, tokens[:, 13:], None, cache)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), prefilled, atol=1e-4)

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
