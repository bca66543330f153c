"""Chunked linear attention kernels (interpret mode) against two independent definitions.

`linear_attention_recurrent` (a scan over time: the recurrence itself) and
`linear_attention_reference` (the quadratic masked form) are checked against each other; the
chunked kernels, both variants (Mosaic-TPU-style and Triton-style) in the Pallas interpreter,
against both, forward and every gradient. Lowering for real TPUs and GPUs is in
`linear_attention_lowering_test.py`.
"""

import functools
import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.linear.kernel import linear_attention
from kernels_pallas.linear.kernel import linear_attention_recurrent
from kernels_pallas.linear.kernel import linear_attention_reference

# Tolerance per dtype, relative to the largest magnitude of the compared array (at least 1).
# f32: the forms differ only in summation order. bf16: the kernels compute in f32 from the same
# rounded inputs as the f32 reference, then round outputs and gradients to bf16 (2^-8 ~ 4e-3),
# so a few bf16 ulps.
TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}
DECAYS = ("none", "constant", "data", "channel")


def random_inputs(seed, b, t, n, nk, dk, dv, dtype, decay, with_state):
  """q, k, v scaled so that outputs are O(1), a log decay of the given kind, a state or None."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  q = jnp.asarray(normal(b, t, n, dk) * dk ** -0.5, dtype)
  k = jnp.asarray(normal(b, t, nk, dk) * dk ** -0.5, dtype)
  v = jnp.asarray(normal(b, t, nk, dv), dtype)
  log_decay = {
      "none": None,
      # RetNet's per-head decays 1 - 2^(-5 - h), spread out to make heads differ more.
      "constant": jnp.log(1.0 - 2.0 ** (-1.0 - jnp.arange(n, dtype=jnp.float32))),
      # Mamba-2 style: -softplus(x), from near 0 to strong forgetting.
      "data": -jax.nn.softplus(jnp.asarray(normal(b, t, n) * 2.0)),
      # GLA style: per key channel, each row of the state forgetting at its own rate.
      "channel": -jax.nn.softplus(jnp.asarray(normal(b, t, n, dk) * 2.0)),
  }[decay]
  state = jnp.asarray(normal(b, n, dk, dv)) if with_state else None
  return q, k, v, log_decay, state


def assert_close(test, actual, expected, tol, name):
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  test.assertEqual(actual.shape, expected.shape, name)
  test.assertTrue(np.isfinite(actual).all(), f"{name}: non-finite values")
  scale = max(1.0, float(np.abs(expected).max(initial=0)))
  np.testing.assert_allclose(actual, expected, atol=tol * scale, rtol=0, err_msg=name)


@functools.partial(jax.jit, static_argnames=("fn",))
def outputs_and_grads(fn, q, k, v, log_decay, state):
  """(out, final state) and gradients w.r.t. every input of a loss that weights both outputs."""

  def loss(q, k, v, log_decay, state):
    out, final = fn(q, k, v, log_decay=log_decay, initial_state=state)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    w_final = jnp.sin(jnp.arange(final.size, dtype=jnp.float32)).reshape(final.shape)
    return (out.astype(jnp.float32) * w).sum() + (final * w_final).sum(), (out, final)

  grads, (out, final) = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(
      q, k, v, log_decay, state)
  return out, final, grads


def f32_reference(q, k, v, **kwargs):
  """The reference on the same (possibly bf16-rounded) inputs, in f32."""
  return linear_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                    v.astype(jnp.float32), **kwargs)


# The forms jitted once for the module: one compiled program per call signature (shared by the
# cases that differ only in the kernel's chunk or variant) instead of one per op.
_STATIC = ("scale", "return_final_state")
jit_kernel = jax.jit(linear_attention,
                     static_argnames=_STATIC + ("chunk_size", "interpret", "backend"))
jit_recurrent = jax.jit(linear_attention_recurrent, static_argnames=_STATIC)
jit_reference = jax.jit(linear_attention_reference, static_argnames=_STATIC)
jit_f32_reference = jax.jit(f32_reference, static_argnames=_STATIC)
# One object, so that `outputs_and_grads` (static in `fn`) compiles it once per signature.
_F32_REFERENCE_HALF = functools.partial(f32_reference, scale=0.5)


class ReferenceTest(parameterized.TestCase):

  @parameterized.product(decay=DECAYS, with_state=(False, True))
  def test_quadratic_form_matches_recurrence(self, decay, with_state):
    q, k, v, log_decay, state = random_inputs(0, 2, 37, 4, 2, 6, 5, jnp.float32, decay,
                                              with_state)
    kwargs = dict(log_decay=log_decay, initial_state=state, scale=0.7)
    out, final = jit_reference(q, k, v, **kwargs)
    want_out, want_final = jit_recurrent(q, k, v, **kwargs)
    assert_close(self, out, want_out, 1e-5, "out")
    assert_close(self, final, want_final, 1e-5, "final state")


class ForwardTest(parameterized.TestCase):

  @parameterized.product(decay=DECAYS, with_state=(False, True), chunk=(16, 32),
                         variant=("gpu", "tpu"))
  def test_f32_matches_recurrence_and_reference(self, decay, with_state, chunk, variant):
    # T = 50 needs padding for both chunk sizes.
    q, k, v, log_decay, state = random_inputs(1, 2, 50, 2, 2, 12, 8, jnp.float32, decay,
                                              with_state)
    kwargs = dict(log_decay=log_decay, initial_state=state)
    out, final = jit_kernel(q, k, v, chunk_size=chunk, backend=variant, **kwargs)
    self.assertEqual(out.dtype, jnp.float32)
    self.assertEqual(final.dtype, jnp.float32)
    for name, fn in (("recurrent", jit_recurrent), ("reference", jit_reference)):
      want_out, want_final = fn(q, k, v, **kwargs)
      assert_close(self, out, want_out, 1e-5, f"out vs {name}")
      assert_close(self, final, want_final, 1e-5, f"final state vs {name}")

  @parameterized.product(decay=DECAYS, variant=("gpu", "tpu"))
  def test_bf16_matches_reference(self, decay, variant):
    q, k, v, log_decay, state = random_inputs(2, 1, 45, 4, 2, 16, 16, jnp.bfloat16, decay, True)
    kwargs = dict(log_decay=log_decay, initial_state=state)
    out, final = jit_kernel(q, k, v, chunk_size=16, backend=variant, **kwargs)
    self.assertEqual(out.dtype, jnp.bfloat16)
    want_out, want_final = jit_f32_reference(q, k, v, **kwargs)
    assert_close(self, out, want_out, 3e-2, "out")
    assert_close(self, final, want_final, 3e-2, "final state")

  @parameterized.parameters("gpu", "tpu")
  def test_split_sequence_with_state_passing_equals_one_call(self, variant):
    # The sequence-parallel identity: the second half starts from the first half's state.
    q, k, v, log_decay, state = random_inputs(3, 1, 70, 2, 1, 8, 8, jnp.float32, "data", True)
    call = functools.partial(jit_kernel, chunk_size=16, backend=variant)
    out, final = call(q, k, v, log_decay=log_decay, initial_state=state)
    cut = 37  # not a chunk boundary: both halves are padded
    out1, mid = call(q[:, :cut], k[:, :cut], v[:, :cut], log_decay=log_decay[:, :cut],
                     initial_state=state)
    out2, final2 = call(q[:, cut:], k[:, cut:], v[:, cut:], log_decay=log_decay[:, cut:],
                        initial_state=mid)
    assert_close(self, jnp.concatenate([out1, out2], axis=1), out, 1e-5, "out")
    assert_close(self, final2, final, 1e-5, "final state")

  @parameterized.parameters("gpu", "tpu")
  def test_strong_decay_stays_finite(self, variant):
    # Log decays of -30 per step: within a chunk b_t - b_s reaches +-930 (exp overflows unless
    # masked before the exponential), and every cross-chunk factor underflows to 0. Exponents
    # that are differences of cumulative sums near -900 carry an absolute error of ~900 * 2^-24
    # ~ 5e-5 (as in Mamba-2's kernels), hence the looser tolerance.
    q, k, v, _, state = random_inputs(4, 1, 64, 2, 2, 8, 8, jnp.float32, "none", True)
    log_decay = jnp.full((1, 64, 2), -30.0).at[:, ::5].set(-0.01)
    fn = functools.partial(linear_attention, chunk_size=32, backend=variant)
    out, final, grads = outputs_and_grads(fn, q, k, v, log_decay, state)
    want_out, want_final, want_grads = outputs_and_grads(
        linear_attention_recurrent, q, k, v, log_decay, state)
    assert_close(self, out, want_out, 2e-4, "out")
    assert_close(self, final, want_final, 2e-4, "final state")
    for name, grad, want in zip(("dq", "dk", "dv", "dlog_decay", "dstate"), grads, want_grads):
      assert_close(self, grad, want, 2e-4, name)

  @parameterized.parameters("gpu", "tpu")
  def test_strong_per_channel_decay_stays_finite(self, variant):
    # Half the key channels forget at -30 per step, the others hardly at all: the exact
    # [C, C, Dk] scores never exponentiate a positive number, where the factorised
    # (q e^b)(k e^-b)^T would overflow within a chunk (e^{30 * 15}).
    q, k, v, _, state = random_inputs(4, 1, 40, 2, 2, 8, 8, jnp.float32, "none", True)
    log_decay = jnp.broadcast_to(jnp.where(jnp.arange(8) % 2 == 0, -30.0, -0.01), (1, 40, 2, 8))
    fn = functools.partial(linear_attention, chunk_size=16, backend=variant)
    out, final, grads = outputs_and_grads(fn, q, k, v, log_decay, state)
    want_out, want_final, want_grads = outputs_and_grads(
        linear_attention_recurrent, q, k, v, log_decay, state)
    assert_close(self, out, want_out, 2e-4, "out")
    assert_close(self, final, want_final, 2e-4, "final state")
    for name, grad, want in zip(("dq", "dk", "dv", "dlog_decay", "dstate"), grads, want_grads):
      assert_close(self, grad, want, 2e-4, name)

  def test_options(self):
    q, k, v, log_decay, _ = random_inputs(5, 1, 20, 2, 2, 8, 8, jnp.float32, "constant", False)
    out = jit_kernel(q, k, v, log_decay=log_decay, scale=0.25, chunk_size=16,
                     return_final_state=False)
    want = jit_reference(q, k, v, log_decay=log_decay, scale=0.25, return_final_state=False)
    assert_close(self, out, want, 1e-5, "out")
    # Default chunk size, one chunk covering the sequence.
    out, final = jit_kernel(q, k, v, log_decay=log_decay, backend="tpu")
    want_out, want_final = jit_reference(q, k, v, log_decay=log_decay)
    assert_close(self, out, want_out, 1e-5, "out (default chunk)")
    assert_close(self, final, want_final, 1e-5, "final state (default chunk)")

  def test_rejects_bad_inputs(self):
    q, k, v, _, _ = random_inputs(0, 1, 8, 3, 2, 8, 8, jnp.float32, "none", False)
    with self.assertRaisesRegex(ValueError, "multiple of key/value heads"):
      linear_attention(q, k, v)
    q, k, v, _, _ = random_inputs(0, 1, 8, 2, 1, 8, 8, jnp.float32, "none", False)
    with self.assertRaisesRegex(ValueError, "log_decay must be"):
      linear_attention(q, k, v, log_decay=jnp.zeros((1, 8, 1)))
    with self.assertRaisesRegex(ValueError, "initial_state must be"):
      linear_attention(q, k, v, initial_state=jnp.zeros((1, 2, 8, 4)))
    with self.assertRaisesRegex(ValueError, "TPU kernels need"):
      linear_attention(q, k, v, chunk_size=4, backend="tpu", interpret=False)
    with self.assertRaisesRegex(ValueError, r"chunk_size % 8 == 0 with a per-channel decay"):
      linear_attention(q, k, v, log_decay=jnp.zeros((1, 8, 2, 8)), chunk_size=12, backend="tpu",
                       interpret=False)
    with self.assertRaisesRegex(ValueError, "power-of-two"):
      linear_attention(q, k, v, chunk_size=24, backend="gpu", interpret=False)


# (variant, decay, with_state, chunk, dtype); every gradient, GQA (N = 4 heads on K = 2), T = 45
# padded. Each decay kind and dtype runs on both variants somewhere.
_GRAD_CASES = [(variant, decay, True, 16, jnp.float32)
               for variant, decay in itertools.product(("gpu", "tpu"), DECAYS)]
_GRAD_CASES += [("gpu", "data", False, 32, jnp.float32), ("tpu", "constant", False, 32,
                                                          jnp.float32),
                ("gpu", "data", True, 16, jnp.bfloat16), ("tpu", "constant", True, 32,
                                                          jnp.bfloat16)]


class GradientTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name=f"{variant}_{decay}_{'state' if state else 'zero'}_c{chunk}_"
           f"{jnp.dtype(dtype).name}", variant=variant, decay=decay, with_state=state,
           chunk=chunk, dtype=dtype)
      for variant, decay, state, chunk, dtype in _GRAD_CASES)
  def test_grads_match_reference(self, variant, decay, with_state, chunk, dtype):
    q, k, v, log_decay, state = random_inputs(6, 2, 45, 4, 2, 12, 8, dtype, decay, True)
    if not with_state:
      # Still differentiated: the gradient of a zero initial state is not zero.
      state = jnp.zeros_like(state)
    kernel = functools.partial(linear_attention, chunk_size=chunk, backend=variant, scale=0.5)
    reference = _F32_REFERENCE_HALF
    out, final, grads = outputs_and_grads(kernel, q, k, v, log_decay, state)
    want_out, want_final, want_grads = outputs_and_grads(reference, q, k, v, log_decay, state)
    tol = TOLERANCES[dtype]
    self.assertEqual(out.dtype, dtype)
    assert_close(self, out, want_out, tol, "out")
    assert_close(self, final, want_final, tol, "final state")
    for name, grad, want in zip(("dq", "dk", "dv", "dlog_decay", "dstate"), grads, want_grads):
      if want is None:  # no decay
        self.assertIsNone(grad)
        continue
      self.assertEqual(grad.dtype, want.dtype, name)
      assert_close(self, grad, want, tol, name)


if __name__ == "__main__":
  absltest.main()
