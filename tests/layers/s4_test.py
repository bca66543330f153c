"""The s4 mixer: its FFT (Cauchy kernel) form against its dense recurrence, the DPLR SSM with the
low-rank term zeroed against S4D's diagonal SSM (an independent implementation of the same
system), the HiPPO-LegS initialisation, and the config errors."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax.layers.s4 import S4
from longjax.ops import diagonal_ssm
from longjax.ops import s4_kernel
from tests import testing


class S4Test(absltest.TestCase):

  def test_fft_form_equals_the_recurrence(self):
    layer = S4(8, state_dim=8, dt_max=0.5, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 8)), jnp.float32)
    ys = {}
    for impl in ("fft", "recurrent"):
      layer.impl = impl
      ys[impl], _ = layer(x, positions=jnp.broadcast_to(jnp.arange(12), (2, 12)))
    np.testing.assert_allclose(ys["fft"], ys["recurrent"], atol=2e-5, rtol=2e-4)

  def test_without_the_low_rank_term_it_is_the_diagonal_ssm(self):
    rng = np.random.default_rng(1)
    lam = jnp.asarray(-np.exp(rng.normal(size=(3, 4))) + 1j * rng.normal(size=(3, 4)) * 3)
    b, c = (jnp.asarray(rng.normal(size=(3, 4)) + 1j * rng.normal(size=(3, 4)))
            for _ in range(2))
    dt = jnp.asarray([0.01, 0.1, 0.4], jnp.float32)
    u = jnp.asarray(rng.normal(size=(2, 15, 3)), jnp.float32)
    for impl in ("fft", "recurrent"):
      got, _ = s4_kernel.dplr_ssm(u, lam, jnp.zeros_like(lam), b, c, dt, impl=impl)
      want, _ = diagonal_ssm.diagonal_ssm(u, dt, lam, b, c, method="bilinear", impl="recurrent")
      np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-4, err_msg=impl)

  def test_initialised_from_legs(self):
    layer = S4(4, state_dim=8, rngs=nnx.Rngs(0))
    lam, p, b, _ = s4_kernel.nplr_legs(8)
    _, a, b_layer, _ = layer.ssm_parameters()
    np.testing.assert_allclose(a[2], lam, rtol=1e-5)
    np.testing.assert_allclose(b_layer[1], b, rtol=1e-5)
    np.testing.assert_allclose(layer.p.value[0, :, 0] + 1j * layer.p.value[0, :, 1], p,
                               rtol=1e-5)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("odd_state", {"model.s4.state_dim": 7}, r"model\.s4\.state_dim=7: must be an even"),
      ("impl", {"model.s4.impl": "cauchy"}, r"model\.s4\.impl='cauchy': unknown choice"),
      ("option_it_does_not_have", {"model.mixers": "s4(init=inv)"}, r"s4 has no field 'init'"),
  )
  def test_one_line_errors(self, overrides, pattern):
    cfg = testing.tiny_config(**{"model.mixers": "s4", **overrides})
    with self.assertRaisesRegex(configuration.ConfigError, pattern):
      configuration.validate(cfg, 1)


if __name__ == "__main__":
  absltest.main()
