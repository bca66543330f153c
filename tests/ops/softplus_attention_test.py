"""Tests for longjax.ops.softplus_attention (LSSA / LSSAR, arXiv 2501.13428).

The dense reference is checked against a float64 numpy loop over (batch, head, query) that
spells out the visibility rules and formulas; the blockwise op against the dense reference,
forward and gradients.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from longjax.ops import AlibiBias
from longjax.ops import AttentionMask
from longjax.ops import softplus_attention
from longjax.ops.softplus_attention import softplus_attention_weights

# (atol, rtol) for blockwise vs reference on values of order 1: f32 differs only in summation
# order; bf16 rounds weights (blockwise: unnormalised softplus values and shifted exponentials)
# to bf16 before the value matmuls, a few bf16 ulps (2^-8).
TOLERANCES = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (3e-2, 3e-2)}
# (length_scale, reweight_power): plain softplus + l1, the paper's LSSA, and LSSAR.
METHODS = {"softplus": (False, 0.0), "lssa": (True, 0.0), "lssar": (True, 15.0),
           "lssar_p3": (True, 3.0)}


def random_inputs(seed, batch, t, s, num_heads, num_kv_heads, head_dim, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, t, num_heads, head_dim))
  k = rng.normal(size=(batch, s, num_kv_heads, head_dim))
  v = rng.normal(size=(batch, s, num_kv_heads, head_dim))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def make_mask(kind, batch, t, s):
  """A mask for T queries that are the last T of S keys (q_offset = S - T)."""
  offset = s - t
  if kind == "causal":
    return AttentionMask(causal=True, q_offset=offset)
  if kind == "window":
    return AttentionMask(causal=True, window=7, q_offset=offset)
  if kind == "global":
    return AttentionMask(causal=True, window=5, global_tokens=2, q_offset=offset)
  if kind == "segments":
    rng = np.random.default_rng(1)
    ids = np.sort(rng.integers(1, 4, size=(batch, s)), axis=1)
    ids[0, -3:] = 0  # a padding tail that attends within itself
    ids = jnp.asarray(ids, jnp.int32)
    return AttentionMask(causal=True, window=11, q_offset=offset, q_segment_ids=ids[:, offset:],
                         kv_segment_ids=ids)
  if kind == "bidirectional":
    return AttentionMask(causal=False, window=6, q_offset=offset)
  raise ValueError(kind)


def numpy_visible(mask, batch, t, s):
  """bool [B, T, S] from the mask's rules, written out independently of `AttentionMask.block`."""
  out = np.zeros((batch, t, s), bool)
  for b in range(batch):
    for row in range(t):
      i = int(mask.q_offset) + row
      for j in range(s):
        ok = j <= i if mask.causal else True
        if mask.window is not None:
          near = abs(i - j) < mask.window
          ok &= near or j < mask.global_tokens
        if mask.has_segments:
          ok &= (np.asarray(mask.q_segment_ids)[b, row] == np.asarray(mask.kv_segment_ids)[b, j])
        out[b, row, j] = ok
  return out


def numpy_softplus_attention(q, k, v, visible, *, bias=None, length_scale, power):
  """Float64 loop; returns (out [B, T, N, H], weights [B, N, T, S])."""
  q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
  batch, t, n, h = q.shape
  s, nk = k.shape[1], k.shape[2]
  out = np.zeros((batch, t, n, h))
  weights = np.zeros((batch, n, t, s))
  for b in range(batch):
    for head in range(n):
      kv_head = head // (n // nk)
      for row in range(t):
        keys = np.flatnonzero(visible[b, row])
        count = len(keys)
        if not count:
          continue
        qv, kv = q[b, row, head], k[b, keys, kv_head]
        if length_scale:
          qv = qv / np.linalg.norm(qv)
          kv = kv / np.linalg.norm(kv, axis=1, keepdims=True)
          x = np.log(h) * np.log(count) * (kv @ qv)
        else:
          x = kv @ qv / np.sqrt(h)
        if bias is not None:
          x = x + bias[b, head, row, keys]
        sp = np.log1p(np.exp(x))
        w = sp / sp.sum()
        if power:
          offset = 0.0 if count <= 3 else 1.0
          u = np.maximum(count * w - offset, 0.0)
          if u.sum() > 0:
            w = u ** power / np.sum(u ** power)
        weights[b, head, row, keys] = w
        out[b, row, head] = w @ v[b, keys, kv_head]
  return out, weights


@functools.partial(jax.jit, static_argnames=("impl", "length_scale", "power", "block_size"))
def outputs_and_grads(q, k, v, mask, bias, impl, length_scale, power, block_size=8):
  """out and the gradients w.r.t. q, k, v of a loss with a distinct weight per output entry."""

  def loss(q, k, v):
    out = softplus_attention(q, k, v, mask=mask, bias=bias, length_scale=length_scale,
                             reweight_power=power, impl=impl, block_size=block_size)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    return jnp.sum(out.astype(jnp.float32) * w), out

  grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def as_f32(x):
  return np.asarray(jnp.asarray(x, jnp.float32))


def alibi(num_heads, batch, t, s):
  slopes = 2.0 ** -(8.0 * jnp.arange(1, num_heads + 1) / num_heads)
  q_pos = jnp.broadcast_to(s - t + jnp.arange(t, dtype=jnp.int32), (batch, t))
  kv_pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (batch, s))
  return AlibiBias(slopes=slopes, q_positions=q_pos, kv_positions=kv_pos)


class ReferenceTest(parameterized.TestCase):

  @parameterized.product(mask_kind=("causal", "window", "global", "segments", "bidirectional"),
                         method=("softplus", "lssar"))
  def test_weights_are_l1_normalised(self, mask_kind, method):
    batch, t, s = 2, 9, 13
    q, k, _ = random_inputs(0, batch, t, s, 4, 2, 8)
    mask = make_mask(mask_kind, batch, t, s)
    length_scale, power = METHODS[method]
    weights = np.asarray(softplus_attention_weights(q, k, mask=mask, length_scale=length_scale,
                                                    reweight_power=power))
    visible = numpy_visible(mask, batch, t, s)[:, None]
    self.assertTrue((weights >= 0).all())
    np.testing.assert_array_equal(weights[~np.broadcast_to(visible, weights.shape)], 0.0)
    np.testing.assert_allclose(weights.sum(-1), np.broadcast_to(visible.any(-1), weights.shape[:3]),
                               atol=1e-6)

  @parameterized.named_parameters(*((name, name) for name in METHODS))
  def test_reference_matches_numpy_loop(self, method):
    batch, t, s, n, nk, h = 2, 6, 9, 4, 2, 5
    q, k, v = random_inputs(1, batch, t, s, n, nk, h)
    mask = make_mask("segments", batch, t, s)
    bias = alibi(n, batch, t, s)
    length_scale, power = METHODS[method]
    out = softplus_attention(q, k, v, mask=mask, bias=bias, length_scale=length_scale,
                             reweight_power=power, impl="reference")
    weights = softplus_attention_weights(q, k, mask=mask, bias=bias, length_scale=length_scale,
                                         reweight_power=power)
    expected_out, expected_weights = numpy_softplus_attention(
        q, k, v, numpy_visible(mask, batch, t, s), bias=np.asarray(bias.block(0, t, 0, s)),
        length_scale=length_scale, power=power)
    np.testing.assert_allclose(weights, expected_weights, atol=2e-6, rtol=1e-5)
    np.testing.assert_allclose(out, expected_out, atol=2e-6, rtol=1e-5)

  @parameterized.parameters(("causal", None), ("window", 7), ("window", 4))
  def test_length_scale_closed_form(self, mask_kind, window):
    # Query e1; key 0 is e1 (cosine 1), every other key e2 (cosine 0). Then
    # w_0 = softplus(c) / (softplus(c) + (N - 1) log 2), so w_0 gives back the row's logit
    # multiplier c, which must be log(H) * log(N) with N = min(position + 1, window).
    h, length = 2, 12
    q = jnp.zeros((1, length, 1, h)).at[..., 0].set(1.0)
    k = jnp.zeros((1, length, 1, h)).at[..., 1].set(1.0).at[:, 0].set(jnp.asarray([1.0, 0.0]))
    mask = AttentionMask(causal=True, window=window if mask_kind == "window" else None)
    w0 = np.asarray(softplus_attention_weights(q, k, mask=mask, length_scale=True))[0, 0, :, 0]
    for position in (1, 2, 3, 5, 11):
      count = position + 1 if window is None else min(position + 1, window)
      if count < position + 1:
        self.assertEqual(w0[position], 0.0)  # key 0 left the window
        continue
      softplus_c = w0[position] * (count - 1) * np.log(2.0) / (1.0 - w0[position])
      np.testing.assert_allclose(np.log(np.expm1(softplus_c)), np.log(h) * np.log(count),
                                 rtol=1e-4, err_msg=f"position {position}")

  def test_length_scale_counts_visible_keys_with_a_cache(self):
    # Queries at absolute positions 5..7 of a cache of 16 slots (the tail unwritten) see 6..8
    # keys: the same weights as a prefill over the 8 written keys.
    q, k, _ = random_inputs(2, 1, 8, 16, 2, 2, 4)
    cached = softplus_attention_weights(q[:, 5:], k, mask=AttentionMask(q_offset=5),
                                        length_scale=True, reweight_power=15.0)
    prefill = softplus_attention_weights(q, k[:, :8], mask=AttentionMask(), length_scale=True,
                                         reweight_power=15.0)
    np.testing.assert_allclose(cached[..., :8], prefill[:, :, 5:], atol=1e-6)
    np.testing.assert_array_equal(cached[..., 8:], 0.0)

  def test_reweighting_by_hand(self):
    # r = relu(N w - o)^p / sum(...), o = 0 for rows with N <= 3, from the unsharpened w.
    q, k, _ = random_inputs(3, 2, 10, 10, 2, 1, 8)
    mask = AttentionMask(causal=True)
    w = np.asarray(softplus_attention_weights(q, k, mask=mask, length_scale=True), np.float64)
    counts = np.arange(1, 11, dtype=np.float64)[:, None]
    for power in (1.0, 3.0, 15.0):
      u = np.maximum(counts * w - np.where(counts > 3, 1.0, 0.0), 0.0)
      expected = u ** power / (u ** power).sum(-1, keepdims=True)
      r = softplus_attention_weights(q, k, mask=mask, length_scale=True, reweight_power=power)
      np.testing.assert_allclose(r, expected, atol=1e-6, rtol=1e-5, err_msg=f"p={power}")

  def test_power_zero_is_no_reweighting_and_power_one_keeps_short_rows(self):
    q, k, v = random_inputs(4, 1, 8, 8, 2, 2, 4)
    mask = AttentionMask(causal=True)
    plain = softplus_attention_weights(q, k, mask=mask, length_scale=True)
    off = softplus_attention_weights(q, k, mask=mask, length_scale=True, reweight_power=0.0)
    np.testing.assert_array_equal(off, plain)
    # Rows with N <= 3 have no offset: relu(N w)^1 / sum = w.
    p1 = softplus_attention_weights(q, k, mask=mask, length_scale=True, reweight_power=1.0)
    np.testing.assert_allclose(p1[:, :, :3], plain[:, :, :3], atol=1e-7)
    self.assertGreater(float(jnp.abs(p1[:, :, 3:] - plain[:, :, 3:]).max()), 1e-2)

  def test_uniform_row_keeps_its_weights(self):
    # Identical keys give uniform weights 1 / N: nothing is above uniform, so re-weighting
    # leaves the row as it is (instead of 0 / 0) and the output is the mean of the values.
    q, _, v = random_inputs(5, 1, 6, 6, 2, 1, 4)
    k = jnp.ones((1, 6, 1, 4))
    for impl in ("reference", "blockwise"):
      out, grads = outputs_and_grads(q, k, v, AttentionMask(causal=True), None, impl, True, 15.0,
                                     block_size=4)
      means = np.cumsum(np.asarray(v), axis=1) / np.arange(1, 7)[None, :, None, None]
      np.testing.assert_allclose(out, np.broadcast_to(means, out.shape), atol=1e-5)
      self.assertTrue(all(np.isfinite(g).all() for g in grads), impl)


class BlockwiseTest(parameterized.TestCase):

  def assert_matches_reference(self, q, k, v, mask, method, bias=None, block_size=8):
    atol, rtol = TOLERANCES[q.dtype.type]
    length_scale, power = METHODS[method]
    out, grads = outputs_and_grads(q, k, v, mask, bias, "blockwise", length_scale, power,
                                   block_size)
    ref_out, ref_grads = outputs_and_grads(q, k, v, mask, bias, "reference", length_scale, power)
    self.assertEqual(out.dtype, q.dtype)
    np.testing.assert_allclose(as_f32(out), as_f32(ref_out), atol=atol, rtol=rtol)
    for name, g, ref_g in zip("qkv", grads, ref_grads):
      self.assertEqual(g.dtype, q.dtype)
      self.assertTrue(np.isfinite(as_f32(g)).all(), f"d{name}")
      # Gradients sum over rows or keys: compare on the scale of the largest entry.
      scale = max(1.0, float(np.abs(as_f32(ref_g)).max()))
      np.testing.assert_allclose(as_f32(g), as_f32(ref_g), atol=atol * scale, rtol=rtol,
                                 err_msg=f"d{name}")

  @parameterized.parameters(
      *((jnp.float32, mask_kind, method) for mask_kind in ("causal", "window", "segments",
                                                            "global")
        for method in ("softplus", "lssa", "lssar")),
      # bf16 on fewer cases: the same code paths, only the tolerance differs.
      (jnp.bfloat16, "causal", "softplus"), (jnp.bfloat16, "window", "lssar"),
      (jnp.bfloat16, "segments", "lssa"), (jnp.bfloat16, "global", "lssar"))
  def test_matches_reference(self, dtype, mask_kind, method):
    # 21 queries after 16 earlier keys (q_offset 16), GQA 4 -> 2, blocks of 8: neither length
    # is a multiple of the block.
    batch, t, s = 2, 21, 37
    q, k, v = random_inputs(6, batch, t, s, 4, 2, 8, dtype)
    self.assert_matches_reference(q, k, v, make_mask(mask_kind, batch, t, s), method)

  @parameterized.parameters("lssa", "lssar_p3")
  def test_matches_reference_with_bias(self, method):
    batch, t, s = 1, 19, 19
    q, k, v = random_inputs(7, batch, t, s, 4, 1, 8)
    self.assert_matches_reference(q, k, v, AttentionMask(causal=True), method,
                                  bias=alibi(4, batch, t, s), block_size=8)

  def test_long_row_does_not_overflow(self):
    # N = 700 keys: relu(N w - 1)^15 would overflow float32; the log-domain accumulation not.
    q, k, v = random_inputs(8, 1, 1, 700, 2, 2, 8)
    mask = AttentionMask(causal=True, q_offset=699)
    k = k.at[:, 123].set(q[:, 0] * 3)  # one key much closer to the query than the rest
    ref, _ = outputs_and_grads(q, k, v, mask, None, "reference", True, 15.0)
    out, grads = outputs_and_grads(q, k, v, mask, None, "blockwise", True, 15.0, block_size=128)
    self.assertTrue(np.isfinite(ref).all())
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)
    self.assertTrue(all(np.isfinite(g).all() for g in grads))

  @parameterized.parameters("reference", "blockwise")
  def test_rows_without_keys_are_zero_with_finite_gradients(self, impl):
    # Query segment 9 matches no key; the padded query tail (segment 0) sees only padding keys.
    batch, t, s = 1, 10, 10
    q, k, v = random_inputs(9, batch, t, s, 2, 2, 4)
    kv_ids = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 2, 0, 0]], jnp.int32)
    q_ids = kv_ids.at[0, 2].set(9)
    mask = AttentionMask(causal=True, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    for method in ("softplus", "lssar"):
      length_scale, power = METHODS[method]
      out, grads = outputs_and_grads(q, k, v, mask, None, impl, length_scale, power,
                                     block_size=4)
      self.assertTrue(np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads))
      np.testing.assert_array_equal(out[0, 2], 0.0)

  def test_memory_grows_linearly(self):
    # Compiled temp memory of fwd+bwd with re-weighting: blockwise O((T + S) * H + C^2) vs
    # the dense reference's O(T * S).
    def temp_bytes(impl, length):
      x = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)

      def loss(q, k, v):
        return softplus_attention(q, k, v, mask=AttentionMask(causal=True), length_scale=True,
                                  reweight_power=15.0, impl=impl, block_size=128).sum()

      compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    blockwise = temp_bytes("blockwise", 4096) / temp_bytes("blockwise", 2048)
    reference = temp_bytes("reference", 4096) / temp_bytes("reference", 2048)
    self.assertLess(blockwise, 2.5)
    self.assertGreater(reference, 3.5)

  def test_bad_arguments(self):
    q, k, v = random_inputs(10, 1, 4, 4, 2, 2, 4)
    with self.assertRaisesRegex(ValueError, "reweight_power must be 0 .off. or >= 1"):
      softplus_attention(q, k, v, mask=AttentionMask(), reweight_power=0.5)
    with self.assertRaisesRegex(ValueError, "multiple of kv heads"):
      softplus_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2),
                         mask=AttentionMask())
    with self.assertRaisesRegex(ValueError, "valid choices"):
      softplus_attention(q, k, v, mask=AttentionMask(), impl="flash")
    for kernel in ("splash", "pallas"):  # no kernel computes softplus rows
      with self.assertRaisesRegex(ValueError, f"impl='{kernel}' is not an implementation of "
                                  r"softplus attention; valid choices: \('auto', "
                                  r"'reference', 'blockwise'\)"):
        softplus_attention(q, k, v, mask=AttentionMask(), impl=kernel)


if __name__ == "__main__":
  absltest.main()
