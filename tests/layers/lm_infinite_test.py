"""LM-Infinite attention against a per-query numpy loop with explicit clamped distances."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from longjax import posenc
from longjax.layers import attention
from longjax.layers import lm_infinite
from longjax.layers.positional import POSENCS
from longjax.models import build_model
from longjax.models.generate import generate
from tests.models.lm_test import TOLERANCE
from tests.models.lm_test import _forward
from tests.models.lm_test import decode_one_by_one
from tests.models.lm_test import tiny_model_config
from tests.models import learned_bias_model_test

# The Λ layout of the decode tests: 2 global tokens + a window of 4 = 6 cache slots, so the
# 13-token sequences below wrap the ring; the ceiling (6) is a distance the window never shows.
SINKS, WINDOW, CEILING, LENGTH = 2, 4, 6, 13
LM_INFINITE = {"attention.window": WINDOW, "attention.sink_tokens": SINKS,
               "attention.distance_ceiling": CEILING}


def _rope(x, p, theta=10_000.0):
  """Rotates the last axis (half layout) by position p, float64 numpy."""
  h = x.shape[-1]
  freqs = theta ** (-np.arange(0, h, 2) / h)
  z = (x[..., : h // 2] + 1j * x[..., h // 2:]) * np.exp(1j * p * freqs)
  return np.concatenate([z.real, z.imag], axis=-1)


def _reference(q, k, v, *, window, g, ceiling, rope: bool, slopes=None):
  """q [T, N, H], k/v [T, K, H]: for each query i and Λ-visible key j the distance is i - j
  inside the window and `ceiling` for global keys outside it; it enters through the rotation
  (RoPE: q rotated by the distance, k by 0) or through ALiBi's slopes."""
  t_len, n, h = q.shape
  group = n // k.shape[1]
  out = np.zeros_like(q)
  for i in range(t_len):
    for head in range(n):
      keys = [j for j in range(i + 1) if i - j < window or j < g]
      dist = [i - j if i - j < window else ceiling for j in keys]
      logits = []
      for j, d in zip(keys, dist):
        qi, kj = q[i, head], k[j, head // group]
        if rope:
          qi, kj = _rope(qi, d), _rope(kj, 0)
        logits.append(qi @ kj / np.sqrt(h) - (slopes[head] * d if slopes is not None else 0.0))
      logits = np.asarray(logits)
      p = np.exp(logits - logits.max())
      p /= p.sum()
      out[i, head] = sum(pj * v[j, head // group] for pj, j in zip(p, keys))
  return out


class LmInfiniteTest(parameterized.TestCase):

  @parameterized.parameters(("rope", "blockwise"), ("rope", "reference"), ("alibi", "reference"))
  def test_matches_clamped_distance_reference(self, kind, impl):
    cfg = tiny_model_config(**{"posenc.kind": kind, "num_heads": 4, "num_kv_heads": 2,
                               "width": 32})
    positional = POSENCS[kind].attention(cfg, None)
    rng = np.random.RandomState(0)
    t_len, n, kv, h = 23, 4, 2, 8
    q, k, v = (rng.randn(1, t_len, heads, h) for heads in (n, kv, kv))
    positions = jnp.arange(t_len, dtype=jnp.int32)[None]
    got = lm_infinite.lm_infinite_attention(
        jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
        positions, segment_ids=None, window=5, global_tokens=3, ceiling=7,
        positional=positional, scale_queries=lambda x, p: x, impl=impl, block_size=8)
    slopes = posenc.alibi_slopes(positional.num_heads) if kind == "alibi" else None
    expected = _reference(q[0], k[0], v[0], window=5, g=3, ceiling=7, rope=kind == "rope",
                          slopes=slopes)
    np.testing.assert_allclose(np.asarray(got)[0], expected, atol=2e-5, rtol=2e-5)


  @parameterized.parameters("rope", "alibi")
  def test_decode_equals_full_pass_at_true_positions(self, kind):
    # Rows at different offsets and log-n scaling: the decode step must use the positions it is
    # given (not the token index or re-assigned ones) for queries and cached keys alike. A chunk
    # longer than the cache (9 > 6), then single tokens.
    cfg = tiny_model_config(**{"posenc.kind": kind, "num_heads": 4, "num_kv_heads": 2,
                               "width": 32})
    positional = POSENCS[kind].attention(cfg, None)
    rng = np.random.RandomState(1)
    n, kv, h = 4, 2, 8
    q, k, v = (jnp.asarray(rng.randn(2, LENGTH, heads, h), jnp.float32) for heads in (n, kv, kv))
    positions = jnp.arange(LENGTH, dtype=jnp.int32)[None] + jnp.asarray([[0], [37]], jnp.int32)
    scale = functools.partial(attention.log_scale_queries, train_length=4)
    common = dict(window=WINDOW, global_tokens=SINKS, ceiling=CEILING, positional=positional,
                  scale_queries=scale, impl="auto", block_size=None)
    full = lm_infinite.lm_infinite_attention(q, k, v, positions, segment_ids=None, **common)
    cache = lm_infinite.init_lm_infinite_cache(2, SINKS, WINDOW, kv, h, jnp.float32)
    outs = []
    for start, stop in [(0, 9)] + [(t, t + 1) for t in range(9, LENGTH)]:
      out, cache = lm_infinite.lm_infinite_decode(
          q[:, start:stop], k[:, start:stop], v[:, start:stop], positions[:, start:stop], cache,
          **common)
      outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-5, rtol=0)
    self.assertEqual(int(cache.end), LENGTH)
    self.assertEqual(cache.k.shape, (2, SINKS + WINDOW, kv, h))


def _lm_infinite_model(kind: str, seed: int, **overrides):
  """A tiny LM-Infinite DecoderLM: (model, graphdef, params), learned bias tables randomised."""
  model = build_model(tiny_model_config(**{"posenc.kind": kind, "num_kv_heads": 2,
                                           **LM_INFINITE, **overrides}),
                      vocab_size=50, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  if kind in learned_bias_model_test.KINDS:  # T5's table starts at zero: no signal to test
    state = nnx.State(learned_bias_model_test.randomise_positional(state.to_pure_dict(), seed))
  return model, graphdef, state


class LmInfiniteDecodeTest(parameterized.TestCase):

  # t5 through the blockwise op with blocks of 4 (the others resolve to the dense reference).
  @parameterized.parameters(("rope", "auto"), ("alibi", "auto"), ("t5", "blockwise"))
  def test_prefill_equals_token_by_token_decode(self, kind, impl):
    model, graphdef, params = _lm_infinite_model(kind, 0, **{"attention.impl": impl,
                                                             "attention.block_size": 4})
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, LENGTH)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    cache = model.init_cache(2, LENGTH)
    decoded, cache = decode_one_by_one(graphdef, params, tokens, cache)
    np.testing.assert_allclose(decoded, full, atol=TOLERANCE["float32"], rtol=0)
    # The cache is O(sinks + window): the same shapes for any length, before and after.
    shapes = lambda c: jax.tree.map(jnp.shape, c)
    self.assertEqual(shapes(cache), shapes(model.init_cache(2, LENGTH)))
    self.assertEqual(shapes(cache), shapes(model.init_cache(2, 100 * LENGTH)))
    self.assertEqual(cache[0].k.shape[1], SINKS + WINDOW)
    # The test can fail: StreamingLLM's re-assigned positions (the same weights without the
    # ceiling) give other logits once the ring wraps.
    streaming, s_graphdef, _ = _lm_infinite_model(
        kind, 0, **{"attention.impl": impl, "attention.block_size": 4,
                    "attention.distance_ceiling": 0})
    restreamed, _ = decode_one_by_one(s_graphdef, params, tokens, streaming.init_cache(2, LENGTH))
    self.assertGreater(float(jnp.max(jnp.abs(restreamed - full))), 100 * TOLERANCE["float32"])

  @parameterized.parameters("rope", "alibi", "t5")
  def test_chunked_prefill_then_decode(self, kind):
    # A prompt of 8 (> the 6 cache slots) in one call, then single tokens.
    model, graphdef, params = _lm_infinite_model(kind, 1)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 50, (3, LENGTH)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    first, cache = _forward(graphdef, params, tokens[:, :8], None, model.init_cache(3, LENGTH))
    rest, cache = decode_one_by_one(graphdef, params, tokens[:, 8:], cache)
    np.testing.assert_allclose(jnp.concatenate([first, rest], axis=1), full,
                               atol=TOLERANCE["float32"], rtol=0)
    self.assertEqual(int(cache[0].end), LENGTH)

  @parameterized.parameters("rope", "t5")
  def test_greedy_generation_matches_repeated_full_forward(self, kind):
    _, graphdef, params = _lm_infinite_model(kind, 4)
    prompt = jnp.asarray(np.random.RandomState(4).randint(0, 50, (2, 5)), jnp.int32)
    out = generate(graphdef, params, prompt, jax.random.key(0), max_new_tokens=8)
    # One compiled length: the causal model's logits at i ignore the zeros after i.
    seq = jnp.zeros((2, 13), jnp.int32).at[:, :5].set(prompt)
    for i in range(5, 13):
      logits, _ = _forward(graphdef, params, seq)
      seq = seq.at[:, i].set(jnp.argmax(logits[:, i - 1], -1).astype(jnp.int32))
    np.testing.assert_array_equal(out, seq)


if __name__ == "__main__":
  absltest.main()
