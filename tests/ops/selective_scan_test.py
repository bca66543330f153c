"""The selective-scan op: the recurrence and the C++ CPU kernel against a float64 numpy loop
(document resets, initial state, grouped B/C, D and the step-size bias), their gradients against
the kernel package's plain `lax.scan` reference, the CPU kernel's checkpointed backward over
several chunks, the Pallas kernel through the op, and dispatch."""

import dataclasses
import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.scan import selective_scan_reference
from longjax.ops import dispatch
from longjax.ops import selective_scan as ss

B, T, E, N, G = 2, 11, 32, 3, 2  # 16 channels per group: the CPU kernel's multiple


def _inputs(seed=0, groups=G, t=T, e=E, n=N):
  rng = np.random.default_rng(seed)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  bc_shape = (B, t, groups, n) if groups else (B, t, n)
  return dict(u=f(B, t, e), delta=f(B, t, e), a=-jnp.exp(f(e, n)), b=f(*bc_shape),
              c=f(*bc_shape), d_skip=f(e), delta_bias=f(e), initial_state=f(B, e, n))


def _numpy_loop(u, delta, a, b, c, d_skip, delta_bias, initial_state, segment_ids=None):
  u, delta, a, b, c, d_skip, delta_bias, h = (
      np.asarray(x, np.float64) for x in (u, delta, a, b, c, d_skip, delta_bias, initial_state))
  if b.ndim == 3:
    b, c = b[:, :, None], c[:, :, None]
  per = E // b.shape[2]
  y = np.zeros(u.shape)
  for i in range(B):
    for t in range(T):
      dt = np.log1p(np.exp(delta[i, t] + delta_bias))
      keep = 0.0 if segment_ids is not None and t and segment_ids[i, t] != segment_ids[i, t - 1] \
          else 1.0
      for e in range(E):
        h[i, e] = keep * np.exp(dt[e] * a[e]) * h[i, e] + dt[e] * u[i, t, e] * b[i, t, e // per]
        y[i, t, e] = h[i, e] @ c[i, t, e // per] + d_skip[e] * u[i, t, e]
  return y, h


_op = jax.jit(ss.selective_scan, static_argnames=("impl",))


class SelectiveScanTest(parameterized.TestCase):

  # The recurrence in one block, in blocks of 4 (padded), without groups; the CPU kernel.
  @parameterized.parameters(("recurrent", 64, G), ("recurrent", 4, G), ("recurrent", 4, 0),
                            ("cpu", 4, G), ("cpu", 4, 0))
  def test_equals_numpy_loop_with_resets(self, impl, block, groups):
    args = _inputs(groups=groups)
    segment_ids = jnp.asarray([[0] * 4 + [1] * 5 + [2] * 2, [3] * T])
    with mock.patch.object(ss, "BLOCK", block):
      y, final = jax.jit(functools.partial(ss.selective_scan, impl=impl))(
          **args, segment_ids=segment_ids)
    want_y, want_final = _numpy_loop(**args, segment_ids=np.asarray(segment_ids))
    np.testing.assert_allclose(y, want_y, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(final, want_final, atol=2e-5, rtol=2e-5)

  @parameterized.parameters("recurrent", "cpu")
  def test_gradients_equal_the_plain_scan(self, impl):
    args = _inputs(seed=1)
    weights = np.random.default_rng(2).normal(size=(B, T, E)).astype(np.float32)

    def loss(fn, args):
      y, final = fn(**args)
      return jnp.sum(y * weights) + jnp.sum(jnp.sin(final))

    ours = lambda **a: ss.selective_scan(**a, impl=impl)  # noqa: E731
    theirs = lambda **a: selective_scan_reference(  # noqa: E731
        a["u"], a["delta"], a["a"], a["b"], a["c"], a["d_skip"], delta_bias=a["delta_bias"],
        initial_state=a["initial_state"])
    with mock.patch.object(ss, "BLOCK", 4):
      got = jax.jit(jax.grad(functools.partial(loss, ours)))(args)
    want = jax.jit(jax.grad(functools.partial(loss, theirs)))(args)
    for name in args:
      np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=1e-4, err_msg=name)

  @parameterized.parameters((16, 2), (3, 1))  # lane sums of dB, dC: whole vectors; the tail
  def test_cpu_kernel_over_several_checkpoint_chunks(self, n, groups):
    # 150 steps: three of the backward pass's 64-step chunks, the last one partial; resets on
    # both sides of a chunk edge; 64 channels per group: tasks of 64 channels (4 or 8 vectors).
    args = _inputs(seed=4, groups=groups, t=150, e=64 * groups, n=n)
    segment_ids = jnp.asarray([[0] * 63 + [1] * 2 + [2] * 85, [0] * 150])
    weights = np.random.default_rng(5).normal(size=args["u"].shape).astype(np.float32)

    def loss(impl, args):
      y, final = ss.selective_scan(**args, segment_ids=segment_ids, impl=impl)
      return jnp.sum(y * weights) + jnp.sum(jnp.sin(final)), (y, final)

    run = lambda impl: jax.jit(jax.grad(functools.partial(loss, impl), has_aux=True))(args)  # noqa: E731
    (got, got_out), (want, want_out) = run("cpu"), run("recurrent")
    for g, w in zip(got_out, want_out):
      np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
    for name in args:
      np.testing.assert_allclose(got[name], want[name], atol=2e-4, rtol=2e-4, err_msg=name)

  def test_pallas_kernel_through_the_op(self):
    args = _inputs(seed=3)
    got = _op(**args, impl="pallas")
    want = _op(**args, impl="recurrent")
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)

  def test_dispatch(self):
    call = ss.SelectiveScanCall(length=4096, has_segments=False, channels_per_group=1024)
    self.assertEqual(dispatch.resolve(ss.SELECTIVE_SCAN, "auto", call, backend="cpu").impl,
                     "cpu")
    odd = dataclasses.replace(call, channels_per_group=24)
    resolution = dispatch.resolve(ss.SELECTIVE_SCAN, "auto", odd, backend="cpu")
    self.assertEqual(resolution.impl, "recurrent")
    self.assertIn("not a multiple of 16", resolution.reason)
    self.assertEqual(dispatch.resolve(ss.SELECTIVE_SCAN, "auto", call, backend="gpu").impl,
                     "pallas")
    packed = dataclasses.replace(call, has_segments=True)
    resolution = dispatch.resolve(ss.SELECTIVE_SCAN, "auto", packed, backend="tpu")
    self.assertEqual(resolution.impl, "recurrent")
    self.assertIn("segment_ids", resolution.reason)

  def test_bad_shapes_name_the_argument(self):
    args = _inputs()
    with self.assertRaisesRegex(ValueError, r"A must be \[E=32, N\]"):
      ss.selective_scan(**{**args, "a": args["a"][:, None]})
    with self.assertRaisesRegex(ValueError, r"initial_state must be \[B=2, E=32, N=3\]"):
      ss.selective_scan(**{**args, "initial_state": args["initial_state"][:1]})


if __name__ == "__main__":
  absltest.main()
