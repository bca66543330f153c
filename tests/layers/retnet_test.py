"""RetNet's retention layer against the paper's parallel form written out in float64 numpy
(rotation, decay matrix D, per-head normalisation, swish gate), and its config errors."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax.layers.retnet import Retention
from longjax.layers.retnet import retention_log_decay
from tests import testing


def _rotate(x, positions, theta):
  """e^{i n theta} on feature pairs (i, i + H/2), float64: [T, H] -> [T, H]."""
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  angle = positions[:, None] * freq[None]
  x1, x2 = x[:, :half], x[:, half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)], axis=-1)


def _paper_parallel_form(layer, x, positions):
  """Retention(X) = (Q K^T * D) V per head, D_nm = gamma^(n-m) for n >= m; then GroupNorm,
  the swish gate and W_o (Sun et al. 2023, eqs. 5 and 8)."""
  w_qk, w_vg, w_out = (np.asarray(w.value, np.float64) for w in (layer.w_qk, layer.w_vg,
                                                                  layer.w_out))
  x = np.asarray(x, np.float64)[0]
  t = x.shape[0]
  n_heads, h = w_qk.shape[2], w_qk.shape[3]
  out = np.zeros((t, w_out.shape[-1]))
  for n in range(n_heads):
    gamma = 1.0 - 2.0 ** (-5 - n)
    q = _rotate(x @ w_qk[:, 0, n], positions, 10_000.0)
    k = _rotate(x @ w_qk[:, 1, n], positions, 10_000.0) / np.sqrt(h)
    v, g = x @ w_vg[:, 0, n], x @ w_vg[:, 1, n]
    idx = np.arange(t)
    decay = np.where(idx[:, None] >= idx[None], gamma ** (idx[:, None] - idx[None]), 0.0)
    o = (q @ k.T * decay) @ v
    o = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + 1e-6)
    out += (g / (1.0 + np.exp(-g)) * o) @ w_out[n]
  return out[None]


class RetentionTest(absltest.TestCase):

  def test_decays_are_the_papers(self):
    np.testing.assert_allclose(np.exp(retention_log_decay(4)),
                               [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256], rtol=1e-6)

  def test_layer_equals_the_papers_parallel_form(self):
    layer = Retention(16, 2, 8, chunk_size=4, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 13, 16)), jnp.float32)
    positions = np.arange(3, 16)  # positions need not start at 0: the rotation is relative
    for impl in ("chunked", "recurrent", "reference"):
      layer.impl = impl
      y, _ = layer(x, positions=jnp.asarray(positions)[None])
      np.testing.assert_allclose(y, _paper_parallel_form(layer, x, positions), atol=2e-5,
                                 rtol=2e-4, err_msg=impl)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("zero_value_factor", {"model.retnet.value_factor": 0},
       r"model\.retnet\.value_factor=0: must be an integer >= 1"),
      ("theta_one", {"model.retnet.rope_theta": 1.0},
       r"model\.retnet\.rope_theta=1\.0: must be finite and > 1"),
      ("unknown_impl", {"model.retnet.impl": "flash"},
       r"model\.retnet\.impl='flash': unknown choice \(valid: auto, .*chunked"),
      ("odd_head_dim", {"model.head_dim": 7, "model.posenc.kind": "nope"},
       r"model\.head_dim=7: must be even for model\.retnet's rotation"),
      ("option_it_does_not_have", {"model.mixers": "retnet(feature_map=relu)"},
       r"retnet has no field 'feature_map'"),
      ("per_layer_bad_value", {"model.mixers": "retnet(value_factor=0),attention"},
       r"model\.mixers\[0\]:retnet\.value_factor=0"),
  )
  def test_one_line_errors(self, overrides, pattern):
    cfg = testing.tiny_config(**{"model.mixers": "retnet", **overrides})
    with self.assertRaisesRegex(configuration.ConfigError, pattern):
      configuration.validate(cfg, 1)


if __name__ == "__main__":
  absltest.main()
