"""Flash attention kernels (interpret mode) against the dense reference, forward and gradients.

Both kernel variants (Mosaic-TPU-style and Triton-style) run in the Pallas interpreter on CPU.
The dense reference is itself checked against a loop over (batch, head, query, key) in numpy.
Lowering for real TPUs and GPUs is in `flash_attention_lowering_test.py`; the block-skipping
arithmetic in `block_mask_test.py`.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.flash_attention import flash_attention_reference

# Tolerance per dtype, relative to the largest magnitude of the compared array. f32: the kernels
# and the reference differ only in summation order. bf16: both round probabilities and dS to
# bf16 before matmuls, the kernels relative to a running maximum, and gradients sum many rounded
# terms, so allow a few bf16 ulps (2^-8 ~ 4e-3).
TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def random_inputs(seed, batch, t, s, num_heads, num_kv_heads, head_dim, dtype):
  rng = np.random.default_rng(seed)
  shapes = ((batch, t, num_heads, head_dim), (batch, s, num_kv_heads, head_dim),
            (batch, s, num_kv_heads, head_dim))
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


def packed_segments(seed, batch, length, num_docs=3):
  """Sorted random document ids 1..num_docs with a padding tail of segment 0."""
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.integers(1, num_docs + 1, size=(batch, length)), axis=1)
  ids[:, length - length // 5:] = 0
  return jnp.asarray(ids, jnp.int32)


def alibi_slopes(num_heads):
  return 2.0 ** -(8.0 * jnp.arange(1, num_heads + 1, dtype=jnp.float32) / num_heads)


@functools.partial(jax.jit, static_argnames=("fn",))
def outputs_and_grads(fn, q, k, v):
  """(out, lse) and d/d(q, k, v) of a loss that weights every output entry and every lse."""

  def loss(q, k, v):
    out, lse = fn(q, k, v)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    w_lse = jnp.sin(jnp.arange(lse.size, dtype=jnp.float32)).reshape(lse.shape)
    # Rows that see no key have lse = -inf: leave them out of the loss.
    lse_term = jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0).sum()
    return (out.astype(jnp.float32) * w).sum() + lse_term, (out, lse)

  grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, lse, grads


def assert_close(test, actual, expected, tol, name):
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  test.assertEqual(actual.shape, expected.shape, name)
  np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=name)
  finite = np.isfinite(expected)
  scale = max(1.0, float(np.abs(np.where(finite, expected, 0)).max(initial=0)))
  np.testing.assert_allclose(np.where(finite, actual, 0), np.where(finite, expected, 0),
                             atol=tol * scale, rtol=0, err_msg=name)


def naive_attention(q, k, v, *, causal, window, global_tokens, q_offset, q_ids, kv_ids, slopes,
                    cap, scale):
  """Loops over (b, n, i, j) in float64: the definition, written as plainly as possible."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t, n_, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  out = np.zeros((b_, t, n_, h))
  lse = np.full((b_, n_, t), -np.inf)
  for b in range(b_):
    for n in range(n_):
      for i in range(t):
        pos = i + q_offset
        logits = []
        for j in range(s):
          visible = (not causal or j <= pos)
          if window is not None:
            near = pos - j < window if causal else abs(pos - j) < window
            visible = visible and (near or j < global_tokens)
          if q_ids is not None:
            visible = visible and q_ids[b][i] == kv_ids[b][j]
          if not visible:
            continue
          x = scale * float(np.dot(q[b, i, n], k[b, j, n // (n_ // kh)]))
          if cap is not None:
            x = cap * np.tanh(x / cap)
          if slopes is not None:
            x -= slopes[n] * abs(pos - j)
          logits.append((j, x))
        if logits:
          m = max(x for _, x in logits)
          total = sum(np.exp(x - m) for _, x in logits)
          lse[b, n, i] = m + np.log(total)
          for j, x in logits:
            out[b, i, n] += np.exp(x - m) / total * v[b, j, n // (n_ // kh)]
  return out, lse


class ReferenceTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name="causal_window_global_segments_offset", causal=True, window=3,
           global_tokens=2, q_offset=4, segments=True, alibi=False, cap=None),
      dict(testcase_name="bidirectional_window_alibi_cap", causal=False, window=4,
           global_tokens=0, q_offset=2, segments=False, alibi=True, cap=1.5),
  )
  def test_reference_matches_naive_loop(self, causal, window, global_tokens, q_offset, segments,
                                        alibi, cap):
    b, t, s, n, kh, h = 2, 5, 9, 4, 2, 4
    q, k, v = random_inputs(0, b, t, s, n, kh, h, jnp.float32)
    q_ids = jnp.asarray([[1, 1, 2, 2, 2], [1, 2, 3, 3, 3]]) if segments else None
    kv_ids = jnp.asarray([[1] * 4 + [2] * 5, [1] * 6 + [2] * 3]) if segments else None
    slopes = alibi_slopes(n) if alibi else None
    kwargs = dict(causal=causal, window=window, global_tokens=global_tokens, q_offset=q_offset,
                  q_segment_ids=q_ids, kv_segment_ids=kv_ids, alibi_slopes=slopes,
                  logit_soft_cap=cap)
    out, lse = flash_attention_reference(q, k, v, return_lse=True, **kwargs)
    want_out, want_lse = naive_attention(
        q, k, v, causal=causal, window=window, global_tokens=global_tokens, q_offset=q_offset,
        q_ids=None if q_ids is None else np.asarray(q_ids),
        kv_ids=None if kv_ids is None else np.asarray(kv_ids),
        slopes=None if slopes is None else np.asarray(slopes), cap=cap, scale=h ** -0.5)
    # Row 1 of batch 1 (segment 2) sees no key with index <= its position: a fully masked row.
    if segments:
      self.assertTrue(np.isneginf(want_lse).any())
    assert_close(self, out, want_out, 1e-5, "out")
    assert_close(self, lse, want_lse, 1e-5, "lse")

  def test_reference_matches_longjax_attention(self):
    # The kernel's semantics are those of the library's AttentionMask and AlibiBias.
    from longjax.ops import attention  # pylint: disable=g-import-not-at-top
    from longjax.ops import biases  # pylint: disable=g-import-not-at-top
    from longjax.ops import masks  # pylint: disable=g-import-not-at-top
    b, t, s, n, kh, h = 2, 6, 11, 4, 2, 8
    q, k, v = random_inputs(1, b, t, s, n, kh, h, jnp.float32)
    q_ids, kv_ids = packed_segments(2, b, t), packed_segments(3, b, s)
    slopes = alibi_slopes(n)
    mask = masks.AttentionMask(causal=True, window=4, global_tokens=2, q_offset=5,
                               q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    bias = biases.AlibiBias(slopes=slopes,
                            q_positions=jnp.broadcast_to(5 + jnp.arange(t), (b, t)),
                            kv_positions=jnp.broadcast_to(jnp.arange(s), (b, s)))
    want_out, want_lse = attention.attention_reference(q, k, v, mask=mask, bias=bias,
                                                       scale=h ** -0.5)
    out, lse = flash_attention_reference(
        q, k, v, causal=True, window=4, global_tokens=2, q_offset=5, q_segment_ids=q_ids,
        kv_segment_ids=kv_ids, alibi_slopes=slopes, return_lse=True)
    assert_close(self, out, want_out, 1e-6, "out")
    assert_close(self, lse, want_lse, 1e-6, "lse")


# (name, variant, dtype, shape (B, T, S, N, K, H), blocks (block_q, block_k), mask kwargs).
# T = S = 40 with blocks of 16 needs padding on both axes; N/K = 2 is GQA.
_PAD = (1, 40, 40, 4, 2, 8)
_CASES = (
    ("causal_gqa2", "gpu", jnp.float32, _PAD, (16, 16), dict()),
    ("causal_gqa2", "tpu", jnp.float32, _PAD, (16, 16), dict()),
    ("bidirectional_mha", "gpu", jnp.float32, (2, 40, 40, 2, 2, 8), (16, 16),
     dict(causal=False)),
    ("bidirectional_window", "tpu", jnp.float32, _PAD, (16, 16), dict(causal=False, window=7)),
    ("causal_window_unequal_blocks", "gpu", jnp.float32, (1, 24, 40, 2, 1, 8), (8, 16),
     dict(window=9)),
    ("global_window", "gpu", jnp.float32, _PAD, (16, 16), dict(window=6, global_tokens=3)),
    ("global_window", "tpu", jnp.float32, _PAD, (16, 16), dict(window=6, global_tokens=20)),
    ("segments", "gpu", jnp.float32, (2, 40, 40, 4, 2, 8), (16, 16), dict(segments=True)),
    ("segments_bidirectional", "tpu", jnp.float32, (2, 40, 40, 4, 2, 8), (16, 16),
     dict(segments=True, causal=False)),
    ("decode_offset_window", "gpu", jnp.float32, (2, 8, 40, 4, 2, 8), (8, 16),
     dict(q_offset=32, window=12)),
    ("decode_offset", "tpu", jnp.float32, (1, 5, 40, 4, 2, 8), (8, 16), dict(q_offset=35)),
    ("alibi_soft_cap", "gpu", jnp.float32, _PAD, (16, 16),
     dict(alibi=True, logit_soft_cap=1.0)),
    ("alibi_soft_cap_window", "tpu", jnp.float32, _PAD, (16, 16),
     dict(alibi=True, logit_soft_cap=2.0, window=10)),
    ("causal_gqa2_bf16", "gpu", jnp.bfloat16, _PAD, (16, 16), dict()),
    ("everything_bf16", "tpu", jnp.bfloat16, (2, 40, 40, 4, 2, 8), (16, 16),
     dict(window=8, global_tokens=2, segments=True, alibi=True, logit_soft_cap=3.0,
          q_offset=0)),
    ("default_blocks_gqa4", "gpu", jnp.float32, (1, 33, 70, 4, 1, 8), (None, None),
     dict(window=20)),
)


def _kwargs(case_kwargs, shape):
  b, t, s, n, _, _ = shape
  kwargs = dict(case_kwargs)
  if kwargs.pop("segments", False):
    kwargs["q_segment_ids"] = packed_segments(4, b, t)
    kwargs["kv_segment_ids"] = packed_segments(4, b, s) if t == s else packed_segments(5, b, s)
  if kwargs.pop("alibi", False):
    kwargs["alibi_slopes"] = alibi_slopes(n)
  return kwargs


class FlashAttentionTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name=f"{name}_{variant}", variant=variant, dtype=dtype, shape=shape,
           blocks=blocks, case_kwargs=case_kwargs)
      for name, variant, dtype, shape, blocks, case_kwargs in _CASES)
  def test_matches_reference(self, variant, dtype, shape, blocks, case_kwargs):
    q, k, v = random_inputs(0, *shape, dtype)
    kwargs = _kwargs(case_kwargs, shape)
    kernel = functools.partial(flash_attention, block_q=blocks[0], block_k=blocks[1],
                               backend=variant, return_lse=True, **kwargs)
    # bf16 kernels are compared with the f32 reference on the same (rounded) inputs.
    reference = lambda q, k, v: flash_attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), return_lse=True,
        **kwargs)
    out, lse, grads = outputs_and_grads(kernel, q, k, v)
    want_out, want_lse, want_grads = outputs_and_grads(reference, q, k, v)
    tol = TOLERANCES[dtype]
    self.assertEqual(out.dtype, dtype)
    self.assertEqual(lse.dtype, jnp.float32)
    assert_close(self, out, want_out, tol, "out")
    assert_close(self, lse, want_lse, tol, "lse")
    for name, grad, want in zip(("dq", "dk", "dv"), grads, want_grads):
      self.assertEqual(grad.dtype, dtype)
      assert_close(self, grad, want, tol, name)

  @parameterized.parameters("gpu", "tpu")
  def test_fully_masked_rows_give_zeros_and_finite_grads(self, variant):
    # Queries of segment 9 find no key of their segment.
    b, t, s, n, kh, h = 1, 20, 24, 2, 1, 8
    q, k, v = random_inputs(3, b, t, s, n, kh, h, jnp.float32)
    q_ids = jnp.asarray([[1] * 12 + [9] * 8])
    kv_ids = jnp.ones((1, s), jnp.int32)
    fn = functools.partial(flash_attention, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                           block_q=8, block_k=8, backend=variant, return_lse=True)
    out, lse, grads = outputs_and_grads(fn, q, k, v)
    np.testing.assert_array_equal(out[:, 12:], 0.0)
    self.assertTrue(np.isneginf(lse[:, :, 12:]).all())
    self.assertTrue(np.isfinite(lse[:, :, :12]).all())
    for grad in grads:
      self.assertTrue(np.isfinite(grad).all())
    np.testing.assert_array_equal(grads[0][:, 12:], 0.0)

  @parameterized.parameters("gpu", "tpu")
  def test_skipped_blocks_are_never_read(self, variant):
    # Decoding 16 queries at 48..63 with a window of 8 sees keys 41..63: key blocks 0 and 1
    # (of 16) are invisible to every query. Filled with NaN, they would poison the output or the
    # gradients (0 * NaN = NaN) if a kernel loaded and computed them.
    b, t, s, n, kh, h = 1, 16, 64, 2, 1, 8
    q, k, v = random_inputs(4, b, t, s, n, kh, h, jnp.float32)
    poisoned_k, poisoned_v = (x.at[:, :32].set(jnp.nan) for x in (k, v))
    fn = functools.partial(flash_attention, q_offset=48, window=8, block_q=8, block_k=16,
                           backend=variant, return_lse=True)
    out, lse, (dq, dk, dv) = outputs_and_grads(fn, q, poisoned_k, poisoned_v)
    want_out, want_lse, (want_dq, want_dk, want_dv) = outputs_and_grads(fn, q, k, v)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(lse, want_lse)
    np.testing.assert_array_equal(dq, want_dq)
    np.testing.assert_array_equal(dk[:, 32:], want_dk[:, 32:])
    np.testing.assert_array_equal(dv[:, 32:], want_dv[:, 32:])
    np.testing.assert_array_equal(dk[:, :32], 0.0)
    np.testing.assert_array_equal(dv[:, :32], 0.0)

  @parameterized.parameters("gpu", "tpu")
  def test_alibi_slopes_gradient(self, variant):
    b, t, s, n, kh, h = 2, 20, 28, 4, 2, 8
    q, k, v = random_inputs(6, b, t, s, n, kh, h, jnp.float32)
    w = jnp.cos(jnp.arange(b * t * n * h, dtype=jnp.float32)).reshape(b, t, n, h)
    kwargs = dict(window=9, q_offset=8, logit_soft_cap=2.0)

    def loss(fn, slopes):
      return (fn(q, k, v, alibi_slopes=slopes, **kwargs) * w).sum()

    kernel = functools.partial(flash_attention, block_q=8, block_k=16, backend=variant)
    got = jax.grad(functools.partial(loss, kernel))(alibi_slopes(n))
    want = jax.grad(functools.partial(loss, flash_attention_reference))(alibi_slopes(n))
    self.assertGreater(float(jnp.abs(want).min()), 1e-3)  # a real signal on every head
    assert_close(self, got, want, 2e-5, "dslopes")

  def test_traced_q_offset_does_not_recompile(self):
    b, t, s, n, kh, h = 1, 4, 32, 2, 1, 8
    q, k, v = random_inputs(5, b, t, s, n, kh, h, jnp.float32)
    traces = []

    @jax.jit
    def step(q_offset):
      traces.append(q_offset)
      return flash_attention(q, k, v, q_offset=q_offset, window=10, block_q=8, block_k=8,
                             backend="tpu")

    for offset in (3, 17, 28):
      want = flash_attention_reference(q, k, v, q_offset=offset, window=10)
      assert_close(self, step(jnp.int32(offset)), want, 2e-5, f"offset {offset}")
    self.assertLen(traces, 1)

  def test_rejects_bad_inputs(self):
    q, k, v = random_inputs(0, 1, 8, 8, 3, 2, 8, jnp.float32)
    with self.assertRaisesRegex(ValueError, "multiple of kv heads"):
      flash_attention(q, k, v)
    q, k, v = random_inputs(0, 1, 8, 8, 2, 1, 8, jnp.float32)
    with self.assertRaisesRegex(ValueError, "needs a window"):
      flash_attention(q, k, v, global_tokens=2)
    with self.assertRaisesRegex(ValueError, "TPU kernels need"):
      flash_attention(q, k, v, block_q=8, block_k=64, backend="tpu", interpret=False)
    with self.assertRaisesRegex(ValueError, "power-of-two"):
      flash_attention(q, k, v, block_q=24, block_k=32, backend="gpu", interpret=False)
    with self.assertRaisesRegex(ValueError, "variant"):
      flash_attention(q, k, v, backend="cpu")


class FlashAttentionPropertyTest(absltest.TestCase):

  @hypothesis.settings(max_examples=10, deadline=None, derandomize=True,
                       suppress_health_check=list(hypothesis.HealthCheck))
  @hypothesis.given(data=st.data())
  def test_forward_matches_reference(self, data):
    draw = lambda name, strategy: data.draw(strategy, label=name)
    b = draw("B", st.integers(1, 2))
    t = draw("T", st.integers(1, 40))
    s = draw("S", st.integers(1, 40))
    kh = draw("K", st.integers(1, 2))
    n = kh * draw("G", st.sampled_from([1, 2, 3]))
    causal = draw("causal", st.booleans())
    window = draw("window", st.none() | st.integers(1, 24))
    global_tokens = draw("global", st.integers(0, 5)) if window is not None else 0
    q_offset = draw("q_offset", st.integers(0, 12))
    segments = draw("segments", st.booleans())
    block_q = draw("block_q", st.sampled_from([8, 16]))
    block_k = draw("block_k", st.sampled_from([8, 16]))
    variant = draw("variant", st.sampled_from(["gpu", "tpu"]))
    q, k, v = random_inputs(t * 41 + s, b, t, s, n, kh, 8, jnp.float32)
    kwargs = dict(causal=causal, window=window, global_tokens=global_tokens, q_offset=q_offset)
    if segments:
      kwargs.update(q_segment_ids=packed_segments(t, b, t, num_docs=2),
                    kv_segment_ids=packed_segments(s, b, s, num_docs=2))
    out, lse = flash_attention(q, k, v, block_q=block_q, block_k=block_k, backend=variant,
                               return_lse=True, **kwargs)
    want_out, want_lse = flash_attention_reference(q, k, v, return_lse=True, **kwargs)
    assert_close(self, out, want_out, 2e-5, "out")
    assert_close(self, lse, want_lse, 2e-5, "lse")


if __name__ == "__main__":
  absltest.main()
