"""S4's maths: HiPPO-LegS against its definition entry by entry, the NPLR form reconstructing
it, and the Cauchy + Woodbury kernel against the kernel from naive powers of the discretised
DPLR state matrix."""

from absl.testing import absltest
import jax.numpy as jnp
import numpy as np

from longjax.ops import s4_kernel


class HippoTest(absltest.TestCase):

  def test_legs_matches_its_definition(self):
    a, b = s4_kernel.hippo_legs(6)
    for n in range(6):
      self.assertAlmostEqual(b[n], np.sqrt(2 * n + 1))
      for k in range(6):
        want = (-np.sqrt(2 * n + 1) * np.sqrt(2 * k + 1) if n > k
                else -(n + 1) if n == k else 0.0)
        self.assertAlmostEqual(a[n, k], want, msg=f"A[{n}, {k}]")

  def test_nplr_reconstructs_legs(self):
    a, b = s4_kernel.hippo_legs(8)
    lam, p, bt, v = s4_kernel.nplr_legs(8, half=False)
    np.testing.assert_allclose(v @ (np.diag(lam) - np.outer(p, p.conj())) @ v.conj().T, a,
                               atol=1e-10)
    np.testing.assert_allclose(v @ bt, b, atol=1e-10)
    np.testing.assert_allclose(lam.real, -0.5, atol=1e-12)
    lam_half, *_ = s4_kernel.nplr_legs(8)
    self.assertEqual(lam_half.shape, (4,))
    self.assertTrue((lam_half.imag > 0).all())


class CauchyKernelTest(absltest.TestCase):

  def test_equals_powers_of_the_discrete_matrix(self):
    lam, p, b, _ = s4_kernel.nplr_legs(8)
    rng = np.random.default_rng(0)
    h = 3
    c = rng.normal(size=(h, 4)) + 1j * rng.normal(size=(h, 4))
    dt = np.array([0.01, 0.1, 0.5])
    lam_h, p_h, b_h = (np.broadcast_to(x, (h, 4)) for x in (lam, p, b))
    for length in (16, 17):  # even (z = -1 is a root of unity) and odd
      k = s4_kernel.cauchy_kernel(*(jnp.asarray(x) for x in (lam_h, p_h, b_h, c, dt)), length)
      want = np.zeros((h, length))
      for i in range(h):
        a = np.diag(lam) - np.outer(p, p.conj())
        left = np.linalg.inv(np.eye(4) - dt[i] / 2 * a)
        da, db = left @ (np.eye(4) + dt[i] / 2 * a), left @ (dt[i] * b)
        # The decode recurrence's matrices (Sherman-Morrison, not an inverse) equal them.
        got_da, got_db = s4_kernel.discrete_dense(*(jnp.asarray(x[i:i + 1]) for x in
                                                    (lam_h, p_h, b_h, dt)))
        np.testing.assert_allclose(got_da[0], da, atol=1e-5)
        np.testing.assert_allclose(got_db[0], db, atol=1e-5)
        x = db
        for step in range(length):
          want[i, step] = 2 * np.real(c[i] @ x)
          x = da @ x
      np.testing.assert_allclose(k, want, atol=2e-4 * np.abs(want).max(), rtol=0,
                                 err_msg=f"L={length}")


if __name__ == "__main__":
  absltest.main()
