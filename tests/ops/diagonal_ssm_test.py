"""S4D's maths: each discretisation against an independent closed form on a scalar system
(zero-order hold: the matrix exponential of the augmented system; bilinear: scipy's Tustin
transform on the real 2x2 form of a complex state), the Vandermonde kernel against repeated
powers of the discrete state matrix, and the FFT convolution against the recurrence (outputs,
final state, gradients; with an initial state), packed documents against each alone."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.signal

from longjax.ops import diagonal_ssm as ssm

B, T, H, N = 2, 13, 3, 4


def _system(seed=0):
  rng = np.random.default_rng(seed)
  a = -np.exp(rng.normal(size=(H, N)) - 1.0) + 1j * rng.normal(size=(H, N)) * 3
  b, c = (rng.normal(size=(H, N)) + 1j * rng.normal(size=(H, N)) for _ in range(2))
  dt = np.exp(rng.uniform(np.log(1e-3), np.log(0.5), size=H))
  return dt, a, b, c


class DiscretizationTest(parameterized.TestCase):

  def test_zoh_is_the_exact_solution_for_a_held_input(self):
    dt, a, b, _ = _system()
    da, db = ssm.discretize(jnp.asarray(dt, jnp.float32), jnp.asarray(a, jnp.complex64),
                            jnp.asarray(b, jnp.complex64), "zoh")
    for h, n in ((0, 0), (1, 2), (2, 3)):
      # exp([[a, b], [0, 0]] dt) = [[dA, dB], [0, 1]] for the system x' = a x + b u, u held.
      m = scipy.linalg.expm(np.array([[a[h, n], b[h, n]], [0, 0]]) * dt[h])
      np.testing.assert_allclose(da[h, n], m[0, 0], rtol=1e-5)
      np.testing.assert_allclose(db[h, n], m[0, 1], rtol=1e-4)

  def test_bilinear_is_tustins_transform(self):
    dt, a, b, _ = _system(1)
    da, db = ssm.discretize(jnp.asarray(dt, jnp.float32), jnp.asarray(a, jnp.complex64),
                            jnp.asarray(b, jnp.complex64), "bilinear")
    for h, n in ((0, 1), (2, 2)):
      # The complex scalar as a real 2x2 system on (Re x, Im x).
      ar, ai = a[h, n].real, a[h, n].imag
      am = np.array([[ar, -ai], [ai, ar]])
      bm = np.array([[b[h, n].real], [b[h, n].imag]])
      ad, bd, *_ = scipy.signal.cont2discrete((am, bm, np.eye(2), np.zeros((2, 1))), dt[h],
                                              method="bilinear")
      np.testing.assert_allclose([da[h, n].real, da[h, n].imag], ad[:, 0], rtol=1e-5,
                                 atol=1e-6)
      np.testing.assert_allclose([db[h, n].real, db[h, n].imag], bd[:, 0], rtol=1e-4,
                                 atol=1e-6)


class KernelTest(absltest.TestCase):

  def test_vandermonde_equals_powers_of_the_discrete_matrix(self):
    dt, a, b, c = _system(2)
    da, db = ssm.discretize(jnp.asarray(dt, jnp.float32), jnp.asarray(a, jnp.complex64),
                            jnp.asarray(b, jnp.complex64), "zoh")
    k = ssm.vandermonde_kernel(da, db, jnp.asarray(c, jnp.complex64), 40)
    da, db = np.asarray(da, np.complex128), np.asarray(db, np.complex128)
    power, want = np.ones_like(da), np.zeros((H, 40))
    for step in range(40):
      want[:, step] = 2 * np.real(np.sum(c * db * power, axis=-1))
      power = power * da
    np.testing.assert_allclose(k, want, atol=1e-5, rtol=1e-4)


class FormsTest(absltest.TestCase):

  def test_fft_equals_the_recurrence_with_an_initial_state(self):
    dt, a, b, c = (jnp.asarray(x, jnp.complex64 if np.iscomplexobj(x) else jnp.float32)
                   for x in _system(3))
    rng = np.random.default_rng(4)
    u = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
    d = jnp.asarray(rng.normal(size=(H,)), jnp.float32)
    h0 = jnp.asarray(rng.normal(size=(B, H, N)) + 1j * rng.normal(size=(B, H, N)), jnp.complex64)
    weights = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)

    def loss(impl, u, dt, a, b, c):
      y, final = ssm.diagonal_ssm(u, dt, a, b, c, d, initial_state=h0, impl=impl)
      return jnp.sum(y * weights) + jnp.sum(jnp.abs(final) ** 2), (y, final)

    (got, got_aux), got_grads = jax.jit(jax.value_and_grad(
        functools.partial(loss, "fft"), argnums=(0, 1, 2, 3, 4), has_aux=True))(u, dt, a, b, c)
    (want, want_aux), want_grads = jax.jit(jax.value_and_grad(
        functools.partial(loss, "recurrent"), argnums=(0, 1, 2, 3, 4), has_aux=True))(
            u, dt, a, b, c)
    for g, w in zip((*got_aux, *got_grads), (*want_aux, *want_grads)):
      np.testing.assert_allclose(g, w, atol=2e-4, rtol=2e-4)

  def test_packed_documents_equal_each_alone(self):
    dt, a, b, c = (jnp.asarray(x, jnp.complex64 if np.iscomplexobj(x) else jnp.float32)
                   for x in _system(5))
    rng = np.random.default_rng(6)
    docs = [jnp.asarray(rng.normal(size=(1, n, H)), jnp.float32) for n in (4, 6, 3)]
    segment_ids = jnp.asarray([[0] * 4 + [1] * 6 + [2] * 3])
    packed, _ = ssm.diagonal_ssm(jnp.concatenate(docs, axis=1), dt, a, b, c,
                                 segment_ids=segment_ids)
    alone = [ssm.diagonal_ssm(x, dt, a, b, c, impl="fft")[0] for x in docs]
    np.testing.assert_allclose(packed, jnp.concatenate(alone, axis=1), atol=2e-5, rtol=2e-5)

  def test_dispatch(self):
    resolve = lambda t, seg: ssm.dispatch.resolve(  # noqa: E731
        ssm.DIAGONAL_SSM, "auto", ssm.DiagonalSSMCall(t, seg), backend="cpu").impl
    self.assertEqual([resolve(64, False), resolve(64, True), resolve(1, False)],
                     ["fft", "recurrent", "recurrent"])


if __name__ == "__main__":
  absltest.main()
