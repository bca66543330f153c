"""The s4d mixer (H3's gated block around S4D) against the block written out in numpy with the
SSM as a complex128 recurrence, S4D-Lin and S4D-Inv against their formulas, and the config
errors."""

import math

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax.layers.s4d import S4D
from tests import testing


def _block(layer, x, method):
  w_qkv, kernel, a_real_log, a_imag, b, c, log_dt, d, w_out = (
      np.asarray(p.value, np.float64) for p in (
          layer.w_qkv, layer.shift_kernel, layer.a_real_log, layer.a_imag, layer.b, layer.c,
          layer.log_dt, layer.d_skip, layer.w_out))
  x = np.asarray(x, np.float64)[0]
  t, taps = x.shape[0], kernel.shape[0]
  q, k, v = x @ w_qkv[:, 0], x @ w_qkv[:, 1], x @ w_qkv[:, 2]
  k = np.stack([sum(kernel[i] * k[j - taps + 1 + i] for i in range(taps)
                    if j - taps + 1 + i >= 0) for j in range(t)])
  u = k * v
  a = -np.exp(a_real_log) + 1j * a_imag
  b, c = b[..., 0] + 1j * b[..., 1], c[..., 0] + 1j * c[..., 1]
  dt = np.exp(log_dt)[:, None]
  if method == "zoh":
    da = np.exp(dt * a)
    db = (da - 1) / a * b
  else:
    da = (1 + dt * a / 2) / (1 - dt * a / 2)
    db = dt / (1 - dt * a / 2) * b
  h = np.zeros(a.shape, np.complex128)
  y = np.zeros(u.shape)
  for j in range(t):
    h = da * h + db * u[j][:, None]
    y[j] = 2 * np.real(np.sum(c * h, axis=-1)) + d * u[j]
  return ((q * y) @ w_out)[None]


class S4DTest(parameterized.TestCase):

  @parameterized.parameters("zoh", "bilinear")
  def test_layer_equals_the_block(self, method):
    layer = S4D(8, state_dim=6, discretization=method, dt_max=0.5, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 10, 8)), jnp.float32)
    want = _block(layer, x, method)
    for impl in ("fft", "recurrent"):
      layer.impl = impl
      y, _ = layer(x, positions=jnp.arange(10)[None])
      np.testing.assert_allclose(y, want, atol=3e-5, rtol=3e-4, err_msg=impl)

  def test_initialisations(self):
    lin = S4D(4, state_dim=8, init="lin", rngs=nnx.Rngs(0))
    inv = S4D(4, state_dim=8, init="inv", rngs=nnx.Rngs(0))
    _, a_lin, b, _ = lin.ssm_parameters()
    _, a_inv, _, _ = inv.ssm_parameters()
    n = np.arange(4)
    np.testing.assert_allclose(a_lin[0], -0.5 + 1j * math.pi * n, rtol=1e-6)
    np.testing.assert_allclose(a_inv[0], -0.5 + 1j * (8 / math.pi) * (8 / (2 * n + 1) - 1),
                               rtol=1e-6)
    np.testing.assert_array_equal(b, np.ones((4, 4)))
    self.assertEqual(lin.init_cache(2, 1 << 20).state_bytes_per_sequence, 4 * 4 * 8 + 3 * 4 * 4)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("odd_state", {"model.s4d.state_dim": 5}, r"model\.s4d\.state_dim=5: must be an even"),
      ("init", {"model.s4d.init": "legs"}, r"model\.s4d\.init='legs': unknown choice"),
      ("discretization", {"model.s4d.discretization": "euler"},
       r"model\.s4d\.discretization='euler': unknown choice \(valid: zoh, bilinear\)"),
      ("dt", {"model.s4d.dt_min": 1.0}, r"model\.s4d\.dt_min=1\.0: must satisfy"),
      ("option_it_does_not_have", {"model.mixers": "s4d(window=4)"}, r"s4d has no field"),
  )
  def test_one_line_errors(self, overrides, pattern):
    cfg = testing.tiny_config(**{"model.mixers": "s4d", **overrides})
    with self.assertRaisesRegex(configuration.ConfigError, pattern):
      configuration.validate(cfg, 1)


if __name__ == "__main__":
  absltest.main()
