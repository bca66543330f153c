"""GLA's layer against its recurrence written out in float64 numpy (low-rank sigmoid gate with
temperature, per-channel decay of the state's rows, per-head RMSNorm, swish output gate), and
its config errors."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax.layers.gla import GatedLinearAttention
from tests import testing


def _recurrence(layer, x):
  w_qk, w_vr, down, up, bias, scale, w_out = (
      np.asarray(p.value, np.float64) for p in (layer.w_qk, layer.w_vr, layer.w_gate_down,
                                                layer.w_gate_up, layer.gate_bias,
                                                layer.norm_scale, layer.w_out))
  x = np.asarray(x, np.float64)[0]
  t, n_heads, dk = x.shape[0], w_qk.shape[2], w_qk.shape[3]
  y = np.zeros((t, w_out.shape[-1]))
  for n in range(n_heads):
    state = np.zeros((dk, w_vr.shape[-1]))
    for s in range(t):
      q, k = x[s] @ w_qk[:, 0, n], x[s] @ w_qk[:, 1, n]
      v, r = x[s] @ w_vr[:, 0, n], x[s] @ w_vr[:, 1, n]
      alpha = (1.0 / (1.0 + np.exp(-(x[s] @ down @ up[:, n] + bias[n])))) ** (1 / 16.0)
      state = alpha[:, None] * state + np.outer(k, v)
      o = q @ state / np.sqrt(dk)
      o = o / np.sqrt(np.mean(o * o) + 1e-6) * scale
      y[s] += (r / (1.0 + np.exp(-r)) * o) @ w_out[n]
  return y[None]


class GlaTest(absltest.TestCase):

  def test_layer_equals_the_recurrence(self):
    layer = GatedLinearAttention(16, 2, 8, gate_rank=4, chunk_size=4, rngs=nnx.Rngs(0))
    self.assertEqual(layer.key_dim, 4)  # key_factor 0.5
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 11, 16)), jnp.float32)
    want = _recurrence(layer, x)
    for impl in ("chunked", "recurrent", "reference", "pallas"):
      layer.impl = impl
      y, _ = layer(x, positions=jnp.arange(11)[None])
      np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-4, err_msg=impl)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("zero_key_factor", {"model.gla.key_factor": 0.0},
       r"model\.gla\.key_factor=0\.0: must be in \(0, 4\]"),
      ("zero_rank", {"model.gla.gate_rank": 0}, r"model\.gla\.gate_rank=0: must be an integer"),
      ("low_temperature", {"model.gla.gate_temperature": 0.5},
       r"model\.gla\.gate_temperature=0\.5: must be >= 1"),
      ("impl", {"model.gla.impl": "fast"}, r"model\.gla\.impl='fast': unknown choice"),
      ("option_it_does_not_have", {"model.mixers": "gla(window=4)"},
       r"gla has no field 'window'"),
  )
  def test_one_line_errors(self, overrides, pattern):
    cfg = testing.tiny_config(**{"model.mixers": "gla", **overrides})
    with self.assertRaisesRegex(configuration.ConfigError, pattern):
      configuration.validate(cfg, 1)


if __name__ == "__main__":
  absltest.main()
