"""Based's layer against its naive composition written out in float64 numpy (gated short
convolution, exp(u) to second order as a kernel over all past tokens, softmax over the last W
with rotary positions), the short convolution against a direct sum with document resets, and
the config errors."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax.layers.based import Based
from longjax.ops import short_conv
from tests import testing


def _rotate(x, position, theta=10_000.0):
  """Rotary position on pairs (i, i + H/2), in float64."""
  half = x.shape[-1] // 2
  angle = position * theta ** (-np.arange(half) / half)
  x1, x2 = x[:half], x[half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)])


def _naive_based(layer, x, window):
  kernel, w_gate, w_qk, w_qkv, w_out = (
      np.asarray(p.value, np.float64) for p in (layer.conv_kernel, layer.w_gate, layer.w_qk,
                                                layer.w_window_qkv, layer.w_out))
  x = np.asarray(x, np.float64)[0]
  t, n_heads, f, h = x.shape[0], w_qk.shape[2], w_qk.shape[3], w_qkv.shape[3]
  taps = kernel.shape[0]
  conv = np.stack([sum(kernel[i] * x[s - taps + 1 + i] for i in range(taps)
                       if s - taps + 1 + i >= 0) for s in range(t)])
  c = x + conv * (x @ w_gate)
  y = np.zeros((t, x.shape[1]))
  for n in range(n_heads):
    q, k = c @ w_qk[:, 0, n], c @ w_qk[:, 1, n]
    qw, kw, v = c @ w_qkv[:, 0, n], c @ w_qkv[:, 1, n], c @ w_qkv[:, 2, n]
    for s in range(t):
      u = k[:s + 1] @ q[s] / np.sqrt(f)
      taylor = 1 + u + u * u / 2
      o_lin = taylor @ v[:s + 1] / (taylor.sum() + 1e-6)
      lo = max(0, s - window + 1)
      logits = np.array([_rotate(qw[s], s) @ _rotate(kw[j], j) for j in range(lo, s + 1)])
      p = np.exp((logits - logits.max()) / np.sqrt(h))
      o_win = (p / p.sum()) @ v[lo:s + 1]
      y[s] += (o_lin + o_win) @ w_out[n]
  return y[None]


class BasedTest(absltest.TestCase):

  def test_layer_equals_its_naive_composition(self):
    layer = Based(16, 2, 8, feature_dim=4, window=3, chunk_size=4, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 9, 16)) * 0.5, jnp.float32)
    want = _naive_based(layer, x, window=3)
    for impl in ("chunked", "recurrent"):
      layer.impl = impl
      y, _ = layer(x, positions=jnp.arange(9)[None])
      np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-4, err_msg=impl)

  def test_state_bytes_count_every_part(self):
    layer = Based(16, 2, 8, feature_dim=4, conv_size=3, window=5, rngs=nnx.Rngs(0))
    cache = layer.init_cache(3, 1 << 20)
    linear = 2 * (1 + 4 + 16) * (8 + 1) * 4  # N * F' * (H + 1) float32
    self.assertEqual(cache.state_bytes_per_sequence, linear + (2 * 16 + 2 * 5 * 2 * 8) * 4)


class ShortConvTest(absltest.TestCase):

  def test_direct_sum_with_history_and_resets(self):
    rng = np.random.default_rng(1)
    x, kernel = rng.normal(size=(2, 7, 3)), rng.normal(size=(4, 3))
    history = rng.normal(size=(2, 3, 3))
    segment_ids = np.array([[0, 0, 0, 1, 1, 2, 2], [0] * 7])
    got, new_history = short_conv.causal_conv(jnp.asarray(x, jnp.float32),
                                              jnp.asarray(kernel, jnp.float32),
                                              segment_ids=jnp.asarray(segment_ids))
    np.testing.assert_array_equal(new_history, np.asarray(x[:, -3:], np.float32))
    for b in range(2):
      for t in range(7):
        want = sum(kernel[i] * x[b, t - 3 + i] for i in range(4)
                   if t - 3 + i >= 0 and segment_ids[b, t - 3 + i] == segment_ids[b, t])
        np.testing.assert_allclose(got[b, t], want, atol=1e-5, err_msg=f"{b}, {t}")
    # From a history (decode): the first outputs read it; the split call equals the whole one.
    whole, _ = short_conv.causal_conv(jnp.asarray(x, jnp.float32),
                                      jnp.asarray(kernel, jnp.float32),
                                      history=jnp.asarray(history, jnp.float32))
    head, carried = short_conv.causal_conv(jnp.asarray(x[:, :2], jnp.float32),
                                           jnp.asarray(kernel, jnp.float32),
                                           history=jnp.asarray(history, jnp.float32))
    tail, _ = short_conv.causal_conv(jnp.asarray(x[:, 2:], jnp.float32),
                                     jnp.asarray(kernel, jnp.float32), history=carried)
    np.testing.assert_allclose(jnp.concatenate([head, tail], axis=1), whole, atol=1e-6)
    want0 = sum(kernel[i] * history[:, i] for i in range(3)) + kernel[3] * x[:, 0]
    np.testing.assert_allclose(whole[:, 0], want0, atol=1e-5)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("feature_dim", {"model.based.feature_dim": 0}, r"model\.based\.feature_dim=0: must be in "
       r"1\.\.64"),
      ("conv_size", {"model.based.conv_size": 0}, r"model\.based\.conv_size=0: must be in 1\.\.16"),
      ("window", {"model.based.window": 0}, r"model\.based\.window=0: must be an integer >= 1"),
      ("impl", {"model.based.impl": "fast"}, r"model\.based\.impl='fast': unknown choice"),
      ("odd_head_dim", {"model.head_dim": 7, "model.posenc.kind": "nope"},
       r"model\.head_dim=7: must be even for model\.based"),
      ("option_it_does_not_have", {"model.mixers": "based(decay=2)"},
       r"based has no field 'decay'"),
  )
  def test_one_line_errors(self, overrides, pattern):
    cfg = testing.tiny_config(**{"model.mixers": "based", **overrides})
    with self.assertRaisesRegex(configuration.ConfigError, pattern):
      configuration.validate(cfg, 1)


if __name__ == "__main__":
  absltest.main()
