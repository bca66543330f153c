"""Mamba-2's layer against its recurrence written out in float64 numpy (in-projection, gated
short convolution with bias, softplus step sizes, the per-head SSM h_t = exp(dt A) h + B^T dt x,
C h + D x, grouped B/C, the gated per-group RMSNorm), its initialisation against the reference
implementation's ranges, and its config errors."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax.layers.mamba2 import Mamba2
from tests import testing


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _recurrence(layer, x):
  w_in, kernel, bias, dt_bias, a_log, d_skip, scale, w_out = (
      np.asarray(p.value, np.float64) for p in (
          layer.w_in, layer.conv_kernel, layer.conv_bias, layer.dt_bias, layer.a_log,
          layer.d_skip, layer.norm_scale, layer.w_out))
  x = np.asarray(x, np.float64)[0]
  t = x.shape[0]
  e, g, s, p, n = layer.inner, layer.groups, layer.key_dim, layer.value_dim, layer.num_heads
  taps = kernel.shape[0]
  proj = x @ w_in
  z, xbc, dt_raw = proj[:, :e], proj[:, e:e + e + 2 * g * s], proj[:, -n:]
  conv = np.stack([sum(kernel[i] * xbc[j - taps + 1 + i] for i in range(taps)
                       if j - taps + 1 + i >= 0) for j in range(t)])
  xbc = _silu(conv + bias)
  xs = xbc[:, :e].reshape(t, n, p)
  b_in = xbc[:, e:e + g * s].reshape(t, g, s)
  c_out = xbc[:, e + g * s:].reshape(t, g, s)
  dt = np.log1p(np.exp(dt_raw + dt_bias))
  a = -np.exp(a_log)
  y = np.zeros((t, n, p))
  for h in range(n):
    group = h // (n // g)
    state = np.zeros((s, p))
    for j in range(t):
      state = np.exp(dt[j, h] * a[h]) * state + np.outer(b_in[j, group], dt[j, h] * xs[j, h])
      y[j, h] = c_out[j, group] @ state + d_skip[h] * xs[j, h]
  gated = (y.reshape(t, e) * _silu(z)).reshape(t, g, e // g)
  normed = gated / np.sqrt(np.mean(gated * gated, axis=-1, keepdims=True) + 1e-6)
  return (normed.reshape(t, n, p) * scale.reshape(n, p))[None].reshape(1, t, -1) @ w_out.reshape(
      e, -1)


class Mamba2Test(absltest.TestCase):

  def test_layer_equals_the_recurrence(self):
    # 4 heads of 8 channels in 2 groups of B/C: group sharing and per-group norm are exercised.
    layer = Mamba2(16, state_dim=6, head_dim=8, expand=2, groups=2, chunk_size=4,
                   rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 11, 16)), jnp.float32)
    want = _recurrence(layer, x)
    for impl in ("chunked", "recurrent", "reference", "pallas"):
      layer.impl = impl
      y, _ = layer(x, positions=jnp.arange(11)[None])
      np.testing.assert_allclose(y, want, atol=2e-5, rtol=2e-4, err_msg=impl)

  def test_decay_scale_multiplies_a(self):
    # Stuffed Mamba's stronger forgetting at evaluation time: decay_scale s is the model with
    # A -> s A, i.e. A_log + log s.
    layer = Mamba2(16, state_dim=6, head_dim=8, groups=2, chunk_size=4, rngs=nnx.Rngs(0))
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
    layer = Mamba2(64, head_dim=8, dt_min=0.001, dt_max=0.1, rngs=nnx.Rngs(0))
    dt = np.log1p(np.exp(np.asarray(layer.dt_bias.value)))
    self.assertTrue(((dt >= 0.001 - 1e-6) & (dt <= 0.1 + 1e-6)).all(), dt)
    a = np.exp(np.asarray(layer.a_log.value))
    self.assertTrue(((a >= 1.0) & (a <= 16.0)).all(), a)
    np.testing.assert_array_equal(layer.d_skip.value, np.ones(16))
    self.assertEqual(layer.init_cache(3, 1 << 20).state_bytes_per_sequence,
                     16 * 64 * 8 * 4 + 3 * (128 + 2 * 64) * 4)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("head_dim", {"model.mamba2.head_dim": 48},
       r"model\.mamba2\.head_dim=48: must divide the inner width expand \* width = 128"),
      ("groups", {"model.mamba2.groups": 3}, r"model\.mamba2\.groups=3: must divide the 2 heads"),
      ("state_dim", {"model.mamba2.state_dim": 0},
       r"model\.mamba2\.state_dim=0: must be an integer >= 1"),
      ("dt", {"model.mamba2.dt_min": 0.5}, r"model\.mamba2\.dt_min=0\.5: must satisfy"),
      ("decay_scale", {"model.mamba2.decay_scale": 0.0},
       r"model\.mamba2\.decay_scale=0\.0: must be in \(0, 1000\]"),
      ("impl", {"model.mamba2.impl": "fast"}, r"model\.mamba2\.impl='fast': unknown choice"),
      ("option_it_does_not_have", {"model.mixers": "mamba2(window=4)"},
       r"mamba2 has no field 'window'"),
  )
  def test_one_line_errors(self, overrides, pattern):
    cfg = testing.tiny_config(**{"model.mixers": "mamba2", **overrides})
    with self.assertRaisesRegex(configuration.ConfigError, pattern):
      configuration.validate(cfg, 1)


if __name__ == "__main__":
  absltest.main()
