"""Tests for longjax.ops.dot_product_attention: blockwise against the dense reference.

The dense reference is itself checked against a loop over (batch, head, query) in numpy.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

import kernels_cpu
from longjax.ops import AlibiBias
from longjax.ops import AttentionMask
from longjax.ops import KerpleBias
from longjax.ops import attention
from longjax.ops import dot_product_attention
from longjax.ops import resolve_call

# Per-dtype tolerances for blockwise vs reference, as (atol, rtol) on values of order 1. f32: the
# two differ only in summation order. bf16: both round probabilities to bf16 before the PV and dV
# matmuls, but blockwise rounds them relative to a running maximum and the gradients sum many
# rounded terms, so allow a few bf16 ulps (2^-8 ~ 4e-3).
TOLERANCES = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (3e-2, 3e-2)}


def random_inputs(seed, batch, t, s, num_heads, num_kv_heads, head_dim, dtype):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, t, num_heads, head_dim))
  k = rng.normal(size=(batch, s, num_kv_heads, head_dim))
  v = rng.normal(size=(batch, s, num_kv_heads, head_dim))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def packed_segments(rng, batch, length, num_docs=3):
  """Sorted random document ids 1..num_docs with a padding tail of segment 0."""
  ids = np.sort(rng.integers(1, num_docs + 1, size=(batch, length)), axis=1)
  for b, pad in enumerate(rng.integers(0, length // 3 + 1, size=batch)):
    ids[b, length - pad:] = 0
  return jnp.asarray(ids, jnp.int32)


def alibi(num_heads, batch, t, s, q_offset=0):
  slopes = 2.0 ** -(8.0 * jnp.arange(1, num_heads + 1) / num_heads)
  q_pos = jnp.broadcast_to(q_offset + jnp.arange(t, dtype=jnp.int32), (batch, t))
  kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (batch, s))
  return AlibiBias(slopes=slopes, q_positions=q_pos, kv_positions=kv_pos)


@functools.partial(jax.jit, static_argnames=("impl", "block_size"))
def outputs_and_grads(q, k, v, mask, bias, impl, block_size=None):
  """(out, lse) and the gradients w.r.t. q, k, v of a loss that uses both outputs."""

  def loss(q, k, v):
    out, lse = dot_product_attention(q, k, v, mask=mask, bias=bias, impl=impl,
                                     block_size=block_size, return_lse=True)
    # Fixed pseudo-random weights so every output entry gets a distinct cotangent; lse enters
    # too (rows without keys have lse = -inf and are left out).
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * w) + 0.3 * jnp.sum(jnp.sin(finite_lse)), (out, lse)

  grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, lse, grads


def as_f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


class AttentionTestCase(parameterized.TestCase):

  def assert_matches_reference(self, q, k, v, mask, bias=None, block_size=32):
    atol, rtol = TOLERANCES[q.dtype.type]
    out, lse, grads = outputs_and_grads(q, k, v, mask, bias, "blockwise", block_size)
    ref_out, ref_lse, ref_grads = outputs_and_grads(q, k, v, mask, bias, "reference")
    self.assertEqual(out.dtype, q.dtype)
    self.assertEqual(lse.dtype, jnp.float32)
    self.assertEqual(lse.shape, (q.shape[0], q.shape[2], q.shape[1]))
    np.testing.assert_allclose(as_f32(out), as_f32(ref_out), atol=atol, rtol=rtol)
    # Equal where finite and -inf in the same rows (rows that see no key).
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    np.testing.assert_allclose(as_f32(lse), as_f32(ref_lse), atol=atol, rtol=rtol)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
      self.assertEqual(g.dtype, q.dtype)
      # Gradients sum over rows or keys: compare on the scale of the largest entry.
      scale = max(1.0, float(np.abs(as_f32(ref_g)).max()))
      np.testing.assert_allclose(as_f32(g), as_f32(ref_g), atol=atol * scale, rtol=rtol,
                                 err_msg=f"d{name}")
    return out, ref_out


class ReferenceTest(AttentionTestCase):

  def test_reference_matches_numpy_loop(self):
    batch, t, s, n, nk, h, q_offset, window = 2, 5, 7, 4, 2, 3, 2, 4
    q, k, v = random_inputs(0, batch, t, s, n, nk, h, jnp.float32)
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0]], jnp.int32)
    q_seg = seg[:, q_offset:]
    mask = AttentionMask(causal=True, window=window, q_offset=q_offset, q_segment_ids=q_seg,
                         kv_segment_ids=seg)
    bias = alibi(n, batch, t, s, q_offset)
    out, lse = dot_product_attention(q, k, v, mask=mask, bias=bias, impl="reference",
                                     return_lse=True)

    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    slopes = np.asarray(bias.slopes, np.float64)
    expected_out = np.zeros((batch, t, n, h))
    expected_lse = np.full((batch, n, t), -np.inf)
    for b in range(batch):
      for head in range(n):
        kv_head = head // (n // nk)
        for row in range(t):
          i = q_offset + row
          keys = [j for j in range(s) if j <= i and i - j < window
                  and seg[b, j] == q_seg[b, row]]
          if not keys:
            continue
          logits = np.array([qn[b, row, head] @ kn[b, j, kv_head] / np.sqrt(h)
                             - slopes[head] * abs(i - j) for j in keys])
          weights = np.exp(logits - logits.max())
          expected_out[b, row, head] = weights @ vn[b, keys, kv_head] / weights.sum()
          expected_lse[b, head, row] = logits.max() + np.log(weights.sum())
    np.testing.assert_allclose(out, expected_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, expected_lse, atol=1e-5, rtol=1e-5)


class BlockwiseTest(AttentionTestCase):

  # Segment ids are crossed with causal masks here; bidirectional attention with segment ids is
  # in `test_matches_reference_with("everything")` and the property test (the full product
  # would cost ~10 s more test time on two cores).
  # float32 on every (heads, mask) pair; bfloat16, whose paths are the same with a looser
  # tolerance, on one head grouping per mask.
  @parameterized.parameters(
      *((jnp.float32, kv, mask) for kv in (4, 2, 1)
        for mask in ("causal", "bidirectional", "causal_segments")),
      (jnp.bfloat16, 4, "causal"), (jnp.bfloat16, 2, "bidirectional"),
      (jnp.bfloat16, 1, "causal_segments"))
  def test_matches_reference(self, dtype, num_kv_heads, mask_kind):
    # 100 is not a multiple of the block (32): padded keys and query rows are exercised.
    batch, length = 2, 100
    q, k, v = random_inputs(1, batch, length, length, 4, num_kv_heads, 16, dtype)
    seg = None
    if mask_kind == "causal_segments":
      seg = packed_segments(np.random.default_rng(2), batch, length)
    mask = AttentionMask(causal=mask_kind != "bidirectional", q_segment_ids=seg,
                         kv_segment_ids=seg)
    self.assert_matches_reference(q, k, v, mask)

  @parameterized.product(dtype=(jnp.float32, jnp.bfloat16),
                         feature=("window", "lambda", "alibi", "landmarks", "everything"))
  def test_matches_reference_with(self, dtype, feature):
    batch, length = 2, 100
    q, k, v = random_inputs(3, batch, length, length, 4, 2, 16, dtype)
    seg = packed_segments(np.random.default_rng(4), batch, length)
    if feature == "window":
      mask, bias = AttentionMask(causal=True, window=40), None
    elif feature == "lambda":
      # LM-Infinite: 5 leading keys + a window of 20; with blocks of 32 the loops visit the
      # leading block and the window's blocks and skip those in between.
      mask, bias = AttentionMask(causal=True, window=20, global_tokens=5), None
    elif feature == "alibi":
      mask, bias = AttentionMask(causal=False), alibi(4, batch, length, length)
    elif feature == "landmarks":  # Landmark Attention's main softmax, blocks of 7 off the grid
      mask = AttentionMask(causal=True, landmark_block=7, q_segment_ids=seg, kv_segment_ids=seg)
      bias = alibi(4, batch, length, length)
    else:
      mask = AttentionMask(causal=False, window=33, global_tokens=3, q_segment_ids=seg,
                           kv_segment_ids=seg)
      bias = alibi(4, batch, length, length)
    self.assert_matches_reference(q, k, v, mask, bias)

  @parameterized.parameters((jnp.float32, None), (jnp.bfloat16, 24))
  def test_decode_with_kv_cache(self, dtype, window):
    # The last T rows of full causal attention, computed as T new queries against a cache of
    # capacity S_cache > S whose unwritten tail holds garbage that causal masking must hide.
    batch, s, t, capacity = 2, 100, 8, 128
    q, k, v = random_inputs(5, batch, s, s, 4, 1, 16, dtype)
    full = dot_product_attention(q, k, v, mask=AttentionMask(causal=True, window=window),
                                 impl="reference")
    garbage = jnp.full((batch, capacity - s, 1, 16), 1e4, dtype)
    k_cache = jnp.concatenate([k, garbage], axis=1)
    v_cache = jnp.concatenate([v, garbage], axis=1)
    mask = AttentionMask(causal=True, window=window, q_offset=jnp.int32(s - t))
    atol, rtol = TOLERANCES[dtype]
    for out in self.assert_matches_reference(q[:, -t:], k_cache, v_cache, mask):
      np.testing.assert_allclose(as_f32(out), as_f32(full[:, -t:]), atol=atol, rtol=rtol)

  def test_rows_without_keys(self):
    # Query segment 7 exists among no keys; with blocks of 8 whole blocks of such rows are
    # skipped and others are mixed with visible rows.
    batch, length = 1, 40
    q, k, v = random_inputs(6, batch, length, length, 2, 1, 8, jnp.float32)
    kv_seg = jnp.ones((batch, length), jnp.int32)
    q_seg = kv_seg.at[:, 5:21].set(7)
    mask = AttentionMask(causal=True, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    for impl, block_size in (("blockwise", 8), ("reference", None)):
      out, lse, grads = outputs_and_grads(q, k, v, mask, None, impl, block_size)
      np.testing.assert_array_equal(out[:, 5:21], 0.0)
      self.assertTrue(np.isneginf(lse[:, :, 5:21]).all())
      self.assertTrue(np.isfinite(lse[:, :, :5]).all())
      for g in grads:
        self.assertTrue(np.isfinite(g).all(), impl)
      np.testing.assert_array_equal(grads[0][:, 5:21], 0.0)
    self.assert_matches_reference(q, k, v, mask, block_size=8)

  @hypothesis.settings(max_examples=6, deadline=None, derandomize=True)
  @hypothesis.given(batch=st.integers(1, 2), t=st.integers(1, 40), s=st.integers(1, 40),
                    num_kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 3]),
                    causal=st.booleans(), window=st.sampled_from([None, 1, 6, 17]),
                    global_tokens=st.sampled_from([0, 2, 11]),
                    q_offset=st.integers(0, 30), segments=st.booleans(),
                    use_alibi=st.booleans(), block_size=st.sampled_from([8, 16]))
  def test_random_shapes_and_masks(self, batch, t, s, num_kv_heads, group, causal, window,
                                   global_tokens, q_offset, segments, use_alibi, block_size):
    global_tokens = global_tokens if window is not None else 0
    n = num_kv_heads * group
    q, k, v = random_inputs(7, batch, t, s, n, num_kv_heads, 8, jnp.float32)
    q_seg = kv_seg = None
    if segments:
      rng = np.random.default_rng(8)
      q_seg, kv_seg = packed_segments(rng, batch, t), packed_segments(rng, batch, s)
    mask = AttentionMask(causal=causal, window=window, global_tokens=global_tokens,
                         q_offset=q_offset, q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    bias = alibi(n, batch, t, s, q_offset) if use_alibi else None
    self.assert_matches_reference(q, k, v, mask, bias, block_size=block_size)

  def test_scan_over_layers_with_remat(self):
    # Each layer is `x <- x + attention(x W_q, x W_k, x W_v)` under jax.checkpoint in lax.scan.
    batch, length, n, h, layers = 1, 48, 2, 8, 2
    x = jnp.asarray(np.random.default_rng(9).normal(size=(batch, length, n * h)), jnp.float32)
    weights = jnp.asarray(np.random.default_rng(10).normal(size=(layers, 3, n * h, n * h)),
                          jnp.float32) / np.sqrt(n * h)
    mask = AttentionMask(causal=True, q_offset=jnp.int32(0))

    def loss(weights, impl):
      def layer(x, w):
        q, k, v = (jnp.einsum("btd,de->bte", x, w[i]).reshape(batch, length, n, h)
                   for i in range(3))
        out = dot_product_attention(q, k, v, mask=mask, impl=impl, block_size=16)
        return x + out.reshape(x.shape), None
      y, _ = jax.lax.scan(jax.checkpoint(layer), x, weights)
      return jnp.sum(jnp.sin(y))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    np.testing.assert_allclose(grad(weights, "blockwise"), grad(weights, "reference"),
                               atol=1e-4, rtol=1e-4)

  def test_memory_grows_linearly(self):
    # Compiled temp memory of fwd+bwd: blockwise is O(T*C), dense is O(T*S).
    def temp_bytes(impl, length):
      x = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)

      def loss(q, k, v):
        return dot_product_attention(q, k, v, mask=AttentionMask(causal=True), impl=impl,
                                     block_size=128).sum()

      compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    blockwise = temp_bytes("blockwise", 4096) / temp_bytes("blockwise", 2048)
    reference = temp_bytes("reference", 4096) / temp_bytes("reference", 2048)
    self.assertLess(blockwise, 2.5)
    self.assertGreater(reference, 3.5)


class DispatchTest(parameterized.TestCase):

  def test_auto_rule(self):
    # On the CPU: the fused kernel at every length where it is built; without it (a bias it
    # does not compute) dense while all keys fit one block or when decoding (T <= 16), else
    # blockwise. (The accelerators' order: tests/ops/attention_bundled_test.py.)
    kerple = KerpleBias(r1=jnp.ones(4), r2=jnp.ones(4), q_positions=None, kv_positions=None)
    mask = AttentionMask(causal=True)
    for t, s, expected in ((64, 64, "reference"), (4096, 128, "reference"),
                           (128, 129, "blockwise"), (1, 4096, "reference"),
                           (16, 4096, "reference"), (17, 4096, "blockwise")):
      q, k = (jax.ShapeDtypeStruct((1, n, 4, 32), jnp.float32) for n in (t, s))
      resolution = resolve_call("auto", q, k, mask, kerple, block_size=128, backend="cpu")
      self.assertEqual(resolution.impl, expected)
      self.assertIn("not cpu: it has no in-kernel KerpleBias", resolution.reason)
      if kernels_cpu.unavailable_reason() is None:
        self.assertEqual(resolve_call("auto", q, k, mask, block_size=128, backend="cpu").impl,
                         "cpu")
    q = jax.ShapeDtypeStruct((1, 1, 4, 32), jnp.float32)
    k = jax.ShapeDtypeStruct((1, 4096, 4, 32), jnp.float32)
    forced = resolve_call("reference", q, k, mask)
    self.assertEqual((forced.impl, forced.reason), ("reference", "requested"))
    big = jax.ShapeDtypeStruct((1, 512, 4, 32), jnp.float32)
    self.assertEqual(resolve_call("blockwise", big, big, mask).impl, "blockwise")
    # A dense pass over 512 keys is passed over by "auto" but may be forced.
    self.assertEqual(resolve_call("reference", big, big, mask, block_size=128).impl,
                     "reference")

  def test_cpu_kernel_serves_auto_unless_biased(self):
    # What "auto" runs, told apart by the jaxpr: the kernel is an FFI call; with a bias it does
    # not compute (KERPLE) the blockwise op's loops run instead, and forcing impl="cpu" says
    # why it cannot; ALiBi it computes in-kernel.
    if kernels_cpu.unavailable_reason() is not None:
      self.skipTest(f"fused CPU kernels unavailable: {kernels_cpu.unavailable_reason()}")
    q, k, v = random_inputs(0, 1, 300, 300, 4, 2, 32, jnp.float32)
    mask = AttentionMask(causal=True)
    positions = jnp.arange(300)[None]
    alibi = AlibiBias(jnp.asarray([0.5, 0.25, 0.125, 0.0625]), positions, positions)
    kerple = KerpleBias(r1=jnp.ones(4), r2=jnp.ones(4), q_positions=positions,
                        kv_positions=positions)

    def jaxpr(bias):
      return str(jax.make_jaxpr(lambda q: dot_product_attention(q, k, v, mask=mask,
                                                                bias=bias))(q))

    self.assertIn("LongjaxFlashForward", jaxpr(None))
    self.assertIn("LongjaxFlashForward", jaxpr(alibi))
    attention._warn_cpu_fallback.cache_clear()  # pylint: disable=protected-access
    with self.assertLogs("absl", "WARNING") as logs:  # the fallback costs 2x: it says why, once
      self.assertNotIn("LongjaxFlashForward", jaxpr(kerple))
      jaxpr(kerple)
    self.assertLen(logs.output, 1)
    self.assertIn("cannot serve this call (it has no in-kernel KerpleBias", logs.output[0])
    with self.assertRaisesRegex(ValueError, "impl='cpu' cannot serve this call: it has no "
                                "in-kernel KerpleBias"):
      dot_product_attention(q, k, v, mask=mask, bias=kerple, impl="cpu")
    for bias in (None, alibi):
      np.testing.assert_allclose(
          dot_product_attention(q, k, v, mask=mask, bias=bias, impl="cpu"),
          dot_product_attention(q, k, v, mask=mask, bias=bias, impl="reference"), atol=2e-5)

  @parameterized.parameters("Splash", "flash", "")
  def test_unknown_impl(self, impl):
    q = jax.ShapeDtypeStruct((1, 8, 4, 32), jnp.float32)
    with self.assertRaisesRegex(ValueError, f"impl={impl!r}.*valid choices"):
      resolve_call(impl, q, q, AttentionMask())

  def test_default_scale_and_shapes(self):
    q, k, v = random_inputs(11, 2, 6, 9, 4, 2, 16, jnp.float32)
    mask = AttentionMask(causal=False)
    out = dot_product_attention(q, k, v, mask=mask, impl="blockwise", block_size=4)
    explicit = dot_product_attention(q, k, v, mask=mask, impl="reference", scale=0.25)
    self.assertEqual(out.shape, q.shape)
    np.testing.assert_allclose(out, explicit, atol=1e-5, rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "multiple"):
      dot_product_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2),
                            mask=mask)


if __name__ == "__main__":
  absltest.main()
