"""The learned sink equals one extra always-visible key/value in a plain softmax."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from longjax.models import build_model
from longjax.ops import AttentionMask, add_learned_sink, dot_product_attention
from tests.models.lm_test import TOLERANCE
from tests.models.lm_test import _forward
from tests.models.lm_test import decode_one_by_one
from tests.models.lm_test import tiny_model_config

_TOL = {"float32": 2e-5, "bfloat16": 3e-2}


def _with_sink_reference(q, k, v, visible, k_sink, v_sink):
  """float64 numpy: softmax over [sink, visible keys] per (b, n, t)."""
  q, k, v, k_sink, v_sink = (np.asarray(a, np.float64) for a in (q, k, v, k_sink, v_sink))
  b, t, n, h = q.shape
  group = n // k.shape[2]
  out = np.zeros((b, t, n, h))
  for bi in range(b):
    for ni in range(n):
      kv = ni // group
      for ti in range(t):
        keys = [k_sink[kv]] + [k[bi, s, kv] for s in range(k.shape[1]) if visible[bi, ti, s]]
        vals = [v_sink[kv]] + [v[bi, s, kv] for s in range(k.shape[1]) if visible[bi, ti, s]]
        logits = np.array([q[bi, ti, ni] @ key for key in keys]) / np.sqrt(h)
        w = np.exp(logits - logits.max())
        out[bi, ti, ni] = (w / w.sum()) @ np.array(vals)
  return out


def _inputs(dtype, t=13, kv_heads=2):
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (2, t, 4, 8), dtype)
  k = jax.random.normal(keys[1], (2, t, kv_heads, 8), dtype)
  v = jax.random.normal(keys[2], (2, t, kv_heads, 8), dtype)
  k_sink = jax.random.normal(keys[3], (kv_heads, 8)) * 2
  v_sink = jax.random.normal(keys[4], (kv_heads, 8))
  return q, k, v, k_sink, v_sink


class LearnedSinkTest(parameterized.TestCase):

  @parameterized.product(dtype=["float32", "bfloat16"], impl=["reference", "blockwise"],
                         kv_heads=[1, 2])
  def test_equals_softmax_with_an_extra_key(self, dtype, impl, kv_heads):
    q, k, v, k_sink, v_sink = _inputs(jnp.dtype(dtype), kv_heads=kv_heads)
    segments = jnp.asarray(np.repeat([[1] * 6 + [2] * 7], 2, axis=0), jnp.int32)
    mask = AttentionMask(causal=True, window=4, q_segment_ids=segments, kv_segment_ids=segments)
    out, lse = dot_product_attention(q, k, v, mask=mask, impl=impl, block_size=4,
                                     return_lse=True)
    got = add_learned_sink(out, lse, q, k_sink, v_sink)
    i, j = np.arange(13)[:, None], np.arange(13)[None, :]
    visible = (j <= i) & (i - j < 4) & (np.asarray(segments)[:, :, None]
                                         == np.asarray(segments)[:, None, :])
    want = _with_sink_reference(q, k, v, visible, k_sink, v_sink)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=_TOL[dtype], rtol=0)

  def test_row_without_keys_returns_the_sink_value(self):
    q, k, v, k_sink, v_sink = _inputs(jnp.float32, kv_heads=1)
    q_seg = jnp.ones((2, 13), jnp.int32)
    mask = AttentionMask(causal=True, q_segment_ids=q_seg, kv_segment_ids=q_seg + 1)  # nothing
    out, lse = dot_product_attention(q, k, v, mask=mask, return_lse=True)
    got = add_learned_sink(out, lse, q, k_sink, v_sink)
    np.testing.assert_allclose(got, jnp.broadcast_to(v_sink[0], got.shape), atol=1e-6)

  def test_blockwise_gradients_equal_reference(self):
    q, k, v, k_sink, v_sink = _inputs(jnp.float32)
    mask = AttentionMask(causal=True)

    def loss(args, impl):
      q, k, v, k_sink, v_sink = args
      out, lse = dot_product_attention(q, k, v, mask=mask, impl=impl, block_size=4,
                                       return_lse=True)
      return jnp.sum(jnp.sin(add_learned_sink(out, lse, q, k_sink, v_sink)))

    args = (q, k, v, k_sink, v_sink)
    for got, want in zip(jax.grad(loss)(args, "blockwise"), jax.grad(loss)(args, "reference")):
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def _model_with_random_sink(**overrides):
  cfg = tiny_model_config(**{"attention.learned_sink": True, **overrides})
  model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  sinks = jax.random.normal(jax.random.key(3), params["groups"][0]["mixer"]["sink_kv"].shape)
  params["groups"][0]["mixer"]["sink_kv"].value = sinks
  return model, graphdef, params


class LearnedSinkModelTest(absltest.TestCase):

  def test_prefill_equals_token_by_token_decode(self):
    model, graphdef, params = _model_with_random_sink(num_kv_heads=2)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 11)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    decoded, _ = decode_one_by_one(graphdef, params, tokens, model.init_cache(2, 16))
    np.testing.assert_allclose(decoded, full, atol=TOLERANCE["float32"], rtol=0)
    # The sink matters: the same weights with zero sinks give other logits.
    params["groups"][0]["mixer"]["sink_kv"].value = jnp.zeros_like(
        params["groups"][0]["mixer"]["sink_kv"].value)
    self.assertGreater(float(jnp.abs(_forward(graphdef, params, tokens)[0] - full).max()), 1e-3)

  def test_streaming_cache_keeps_the_learned_sink(self):
    # 7 tokens fit the 2 + 8 slots: positions are not re-assigned yet, so the streaming decode
    # equals the full forward with the same Λ mask.
    model, graphdef, params = _model_with_random_sink(**{"attention.window": 8,
                                                         "attention.sink_tokens": 2})
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 50, (1, 7)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    decoded, _ = decode_one_by_one(graphdef, params, tokens, model.init_cache(1, 16))
    np.testing.assert_allclose(decoded, full, atol=TOLERANCE["float32"], rtol=0)


if __name__ == "__main__":
  absltest.main()
