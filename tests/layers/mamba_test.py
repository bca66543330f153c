"""Mamba's layer against the Mamba-1 block written out in float64 numpy (in-projection, short
convolution with bias, the low-rank input-dependent step size, B and C, the selective scan per
channel and state, D skip, the silu(z) gate), its initialisation against the reference
implementation's (S4D-real A, the step-size bias range), and its config errors."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax.layers.mamba import Mamba
from tests import testing


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _block(layer, x):
  w_in, kernel, bias, w_x, w_dt, dt_bias, a_log, d_skip, w_out = (
      np.asarray(p.value, np.float64) for p in (
          layer.w_in, layer.conv_kernel, layer.conv_bias, layer.w_x, layer.w_dt, layer.dt_bias,
          layer.a_log, layer.d_skip, layer.w_out))
  x = np.asarray(x, np.float64)[0]
  t, taps, r, n = x.shape[0], kernel.shape[0], layer.rank, layer.state_dim
  xs, z = x @ w_in[:, 0], x @ w_in[:, 1]
  conv = np.stack([sum(kernel[i] * xs[j - taps + 1 + i] for i in range(taps)
                       if j - taps + 1 + i >= 0) for j in range(t)])
  xs = _silu(conv + bias)
  proj = xs @ w_x
  dt = np.log1p(np.exp(proj[:, :r] @ w_dt + dt_bias))
  b_in, c_out = proj[:, r:r + n], proj[:, r + n:]
  a = -np.exp(a_log)
  h = np.zeros(a.shape)
  y = np.zeros(xs.shape)
  for j in range(t):
    h = np.exp(dt[j][:, None] * a) * h + (dt[j] * xs[j])[:, None] * b_in[j]
    y[j] = h @ c_out[j] + d_skip * xs[j]
  return ((y * _silu(z)) @ w_out)[None]


class MambaTest(absltest.TestCase):

  def test_layer_equals_the_block(self):
    layer = Mamba(16, state_dim=4, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 11, 16)), jnp.float32)
    want = _block(layer, x)
    for impl in ("recurrent", "pallas"):
      layer.impl = impl
      y, _ = layer(x, positions=jnp.arange(11)[None])
      np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-4, err_msg=impl)

  def test_decay_scale_multiplies_a(self):
    # Stuffed Mamba's stronger forgetting at evaluation time: decay_scale s is the model with
    # A -> s A, i.e. A_log + log s.
    layer = Mamba(16, state_dim=4, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 9, 16)), jnp.float32)
    layer.decay_scale = 3.0
    scaled, _ = layer(x, positions=jnp.arange(9)[None])
    layer.decay_scale = 1.0
    base, _ = layer(x, positions=jnp.arange(9)[None])
    layer.a_log.value = layer.a_log.value + np.log(3.0)
    shifted, _ = layer(x, positions=jnp.arange(9)[None])
    np.testing.assert_allclose(scaled, shifted, atol=1e-5, rtol=1e-5)
    self.assertGreater(float(jnp.abs(scaled - base).max()), 1e-3)

  def test_initialisation_follows_the_reference(self):
    layer = Mamba(64, state_dim=16, rngs=nnx.Rngs(0))
    self.assertEqual(layer.rank, 4)  # ceil(64 / 16)
    np.testing.assert_allclose(np.exp(layer.a_log.value),
                               np.broadcast_to(np.arange(1, 17), (128, 16)), rtol=1e-6)
    dt = np.log1p(np.exp(np.asarray(layer.dt_bias.value)))
    self.assertTrue(((dt >= 0.001 - 1e-6) & (dt <= 0.1 + 1e-6)).all(), dt)
    self.assertEqual(layer.init_cache(3, 1 << 20).state_bytes_per_sequence,
                     128 * 16 * 4 + 3 * 128 * 4)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("state_dim", {"model.mamba.state_dim": 0},
       r"model\.mamba\.state_dim=0: must be an integer >= 1"),
      ("conv_size", {"model.mamba.conv_size": 0}, r"model\.mamba\.conv_size=0: must be in 1\.\.16"),
      ("dt", {"model.mamba.dt_max": 0.0001}, r"model\.mamba\.dt_min=0\.001: must satisfy"),
      ("decay_scale", {"model.mamba.decay_scale": 0.0},
       r"model\.mamba\.decay_scale=0\.0: must be in \(0, 1000\]"),
      ("impl", {"model.mamba.impl": "chunked"}, r"model\.mamba\.impl='chunked': unknown choice"),
      ("option_it_does_not_have", {"model.mixers": "mamba(window=4)"},
       r"mamba has no field 'window'"),
  )
  def test_one_line_errors(self, overrides, pattern):
    cfg = testing.tiny_config(**{"model.mixers": "mamba", **overrides})
    with self.assertRaisesRegex(configuration.ConfigError, pattern):
      configuration.validate(cfg, 1)


if __name__ == "__main__":
  absltest.main()
