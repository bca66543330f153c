"""LM-Infinite attention against a per-query numpy loop with explicit clamped distances."""

from absl.testing import absltest
from absl.testing import parameterized
import jax.numpy as jnp
import numpy as np

from longjax.layers import lm_infinite
from longjax.layers.positional import POSENCS
from tests.models.lm_test import tiny_model_config


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
    slopes = np.asarray(positional.slopes) if kind == "alibi" else None
    expected = _reference(q[0], k[0], v[0], window=5, g=3, ceiling=7, rope=kind == "rope",
                          slopes=slopes)
    np.testing.assert_allclose(np.asarray(got)[0], expected, atol=2e-5, rtol=2e-5)


if __name__ == "__main__":
  absltest.main()
