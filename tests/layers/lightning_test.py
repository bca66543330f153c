"""TransNormerLLM / Lightning attention's layer against its formula written out in float64
numpy (swish q and k, decayed causal sum, SRMSNorm over the heads, the u gate), and its config
errors."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax.layers.lightning import Lightning
from longjax.layers.lightning import lightning_log_decay
from tests import testing


def _formula(layer, x):
  """y = (u * SRMSNorm(o)) W_o with o_t = sum_{s<=t} lambda^(t-s) (q_t . k_s) v_s per head."""
  w, w_out = np.asarray(layer.w_qkvu.value, np.float64), np.asarray(layer.w_out.value, np.float64)
  x = np.asarray(x, np.float64)[0]
  t, n_heads = x.shape[0], w.shape[2]
  swish = lambda z: z / (1.0 + np.exp(-z))
  slopes = 2.0 ** (-8.0 * np.arange(1, n_heads + 1) / n_heads)  # ALiBi, N a power of two
  idx = np.arange(t)
  heads = []
  for n in range(n_heads):
    q, k, v = swish(x @ w[:, 0, n]), swish(x @ w[:, 1, n]), x @ w[:, 2, n]
    decay = np.exp(-slopes[n] * layer.decay_scale * (idx[:, None] - idx[None]))
    heads.append((q @ k.T * np.where(idx[:, None] >= idx[None], decay, 0.0)) @ v)
  o = np.stack(heads, axis=1)  # [T, N, H]
  o = o / np.sqrt(np.mean(o * o, axis=(1, 2), keepdims=True) + 1e-6)
  u = np.einsum("td,dnh->tnh", x, w[:, 3])
  return np.einsum("tnh,nhd->td", u * o, w_out)[None]


class LightningTest(absltest.TestCase):

  def test_decays_are_alibi_slopes_times_the_scale(self):
    np.testing.assert_allclose(np.exp(lightning_log_decay(4, 0.5)),
                               np.exp(-0.5 * np.asarray([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8])),
                               rtol=1e-6)

  def test_layer_equals_the_formula(self):
    layer = Lightning(16, 4, 4, decay_scale=0.5, chunk_size=4, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 13, 16)), jnp.float32)
    want = _formula(layer, x)
    for impl in ("chunked", "recurrent", "reference"):
      layer.impl = impl
      y, _ = layer(x, positions=jnp.arange(13)[None])
      np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-4, err_msg=impl)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("zero_decay_scale", {"model.lightning.decay_scale": 0.0},
       r"model\.lightning\.decay_scale=0\.0: must be in \(0, 1000\]"),
      ("unknown_impl", {"model.lightning.impl": "flash"},
       r"model\.lightning\.impl='flash': unknown choice \(valid: auto, .*chunked"),
      ("option_it_does_not_have", {"model.mixers": "lightning(window=4)"},
       r"lightning has no field 'window'"),
      ("per_layer_bad_value", {"model.mixers": "lightning(decay_scale=-1),attention"},
       r"model\.mixers\[0\]:lightning\.decay_scale=-1\.0"),
  )
  def test_one_line_errors(self, overrides, pattern):
    cfg = testing.tiny_config(**{"model.mixers": "lightning", **overrides})
    with self.assertRaisesRegex(configuration.ConfigError, pattern):
      configuration.validate(cfg, 1)

  def test_the_papers_layer_schedule_is_a_valid_pattern(self):
    schedule = ",".join(f"lightning(decay_scale={1 - l / 3 + 1e-5:.5f})" for l in range(4))
    configuration.validate(testing.tiny_config(**{"model.mixers": schedule,
                                                  "model.num_layers": 4}), 1)


if __name__ == "__main__":
  absltest.main()
