"""Landmark attention kernels (interpret mode) against the dense reference, forward and gradients.

The dense reference is itself checked against a float64 loop over (batch, head, query) that
spells out the paper's grouped softmax, and a property ties both to plain causal attention.
Lowering for real TPUs and GPUs is in `landmark_lowering_test.py`.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.flash.kernel import flash_attention_reference
from longjax.ops.landmark_attention import grouped_softmax_attention
from kernels_pallas.landmark.kernel import landmark_attention
from kernels_pallas.landmark.kernel import landmark_attention_reference

# Relative to the largest magnitude of the compared array. f32: only the summation order
# differs. bf16: probabilities and d(logits) are rounded to bf16 before the matmuls, relative to
# different maxima in the kernels and the reference, so allow a few bf16 ulps (2^-8 ~ 4e-3).
TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def random_inputs(seed, batch, t, num_heads, num_kv_heads, head_dim, dtype):
  rng = np.random.default_rng(seed)
  shapes = ((batch, t, num_heads, head_dim), (batch, t, num_kv_heads, head_dim),
            (batch, t, num_kv_heads, head_dim))
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


def periodic_landmarks(batch, t, landmark_block):
  return np.broadcast_to((np.arange(t) + 1) % landmark_block == 0, (batch, t))


@functools.partial(jax.jit, static_argnames=("fn",))
def outputs_and_grads(fn, q, k, v):
  """(out, lse) and d/d(q, k, v) of a loss that weights every output entry and every lse."""

  def loss(q, k, v):
    out, lse = fn(q, k, v)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    w_lse = jnp.sin(jnp.arange(lse.size, dtype=jnp.float32)).reshape(lse.shape)
    return (out.astype(jnp.float32) * w).sum() + (lse * w_lse).sum(), (out, lse)

  grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, lse, grads


def assert_close(test, actual, expected, tol, name):
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  test.assertEqual(actual.shape, expected.shape, name)
  scale = max(1.0, float(np.abs(expected).max(initial=0)))
  np.testing.assert_allclose(actual, expected, atol=tol * scale, rtol=0, err_msg=name)


def naive_landmark(q, k, v, is_landmark, scale):
  """The grouped softmax in float64 loops, as the paper defines it.

  A position's block is the number of landmarks strictly before it. Query i softmaxes over the
  regular (non-landmark) keys j <= i of its own block together with the landmarks of earlier
  blocks; each such landmark's probability is spread over its block's regular keys by their
  softmax. Landmark values are never used.
  """
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b_, t, n_, h = q.shape
  kh = k.shape[2]
  out = np.zeros((b_, t, n_, h))
  lse = np.full((b_, n_, t), -np.inf)
  for b in range(b_):
    lm = [bool(x) for x in is_landmark[b]]
    block = [sum(lm[:j]) for j in range(t)]
    for n in range(n_):
      kv = n // (n_ // kh)
      def x(i, j, b=b, n=n, kv=kv):  # bound now: a logit of this (batch, head)
        return scale * float(np.dot(q[b, i, n], k[b, j, kv]))
      for i in range(t):
        current = [j for j in range(i + 1) if block[j] == block[i] and not lm[j]]
        landmarks = [j for j in range(i + 1) if block[j] < block[i] and lm[j]]
        logits = {j: x(i, j) for j in current + landmarks}
        if not logits:
          continue
        m = max(logits.values())
        total = sum(np.exp(val - m) for val in logits.values())
        lse[b, n, i] = m + np.log(total)
        for j in current:
          out[b, i, n] += np.exp(logits[j] - m) / total * v[b, j, kv]
        for landmark in landmarks:
          p_landmark = np.exp(logits[landmark] - m) / total
          members = [j for j in range(t) if block[j] == block[landmark] and not lm[j]]
          if not members:
            continue
          inner = {j: x(i, j) for j in members}
          inner_max = max(inner.values())
          inner_total = sum(np.exp(val - inner_max) for val in inner.values())
          for j in members:
            out[b, i, n] += p_landmark * np.exp(inner[j] - inner_max) / inner_total * v[b, j, kv]
  return out, lse


class ReferenceTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name="periodic_gqa2", pattern="periodic"),
      # Landmarks anywhere, including two in a row (a block with no regular token).
      dict(testcase_name="arbitrary_landmarks", pattern="arbitrary"),
  )
  def test_reference_matches_naive_loop(self, pattern):
    b, t, n, kh, h = 2, 11, 4, 2, 4
    q, k, v = random_inputs(0, b, t, n, kh, h, jnp.float32)
    if pattern == "periodic":
      is_landmark = periodic_landmarks(b, t, 3)
      kwargs = dict(landmark_block=3)
    else:
      is_landmark = np.zeros((b, t), bool)
      is_landmark[0, [2, 3, 7]] = True
      is_landmark[1, [4, 9]] = True
      kwargs = dict(is_landmark=jnp.asarray(is_landmark))
    # Jitted: one compiled program instead of one per op.
    out, lse = jax.jit(lambda q, k, v: landmark_attention_reference(
        q, k, v, return_lse=True, **kwargs))(q, k, v)
    want_out, want_lse = naive_landmark(q, k, v, is_landmark, h ** -0.5)
    assert_close(self, out, want_out, 1e-5, "out")
    assert_close(self, lse, want_lse, 1e-5, "lse")


# (name, variant, dtype, shape (B, T, N, K, H), landmark_block, (block_q, block_k)). T is never a
# multiple of the tiles (padding); block_k / Lp blocks share a key tile; landmark_block 5 with
# block_k 8 pads each block to 8 in the layout.
_CASES = (
    ("lb4_gqa2_two_blocks_per_tile", "gpu", jnp.float32, (1, 19, 4, 2, 8), 4, (8, 8)),
    ("lb4_gqa2_four_blocks_per_tile", "tpu", jnp.float32, (1, 19, 4, 2, 8), 4, (4, 16)),
    ("lb8_mha", "gpu", jnp.float32, (2, 21, 2, 2, 8), 8, (8, 8)),
    ("lb8_mha_wide_tiles", "tpu", jnp.float32, (2, 21, 2, 2, 8), 8, (16, 16)),
    ("lb5_padded_layout_gqa2", "gpu", jnp.float32, (1, 23, 2, 1, 8), 5, (8, 8)),
    ("lb4_gqa2_bf16", "gpu", jnp.bfloat16, (1, 30, 4, 2, 16), 4, (8, 16)),
    ("lb8_gqa2_bf16", "tpu", jnp.bfloat16, (1, 30, 4, 2, 16), 8, (8, 8)),
    ("lb8_default_blocks", "gpu", jnp.float32, (1, 30, 4, 2, 8), 8, (None, None)),
)


class LandmarkAttentionTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name=f"{name}_{variant}", variant=variant, dtype=dtype, shape=shape,
           landmark_block=landmark_block, blocks=blocks)
      for name, variant, dtype, shape, landmark_block, blocks in _CASES)
  def test_matches_reference(self, variant, dtype, shape, landmark_block, blocks):
    q, k, v = random_inputs(sum(shape) + landmark_block, *shape, dtype)
    kernel = functools.partial(landmark_attention, landmark_block=landmark_block, block_q=blocks[0],
                               block_k=blocks[1], backend=variant, return_lse=True)
    # bf16 kernels are compared with the f32 reference on the same (rounded) inputs.
    reference = lambda q, k, v: landmark_attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        landmark_block=landmark_block, return_lse=True)
    out, lse, grads = outputs_and_grads(kernel, q, k, v)
    want_out, want_lse, want_grads = outputs_and_grads(reference, q, k, v)
    tol = TOLERANCES[dtype]
    self.assertEqual(out.dtype, dtype)
    assert_close(self, out, want_out, tol, "out")
    assert_close(self, lse, want_lse, tol, "lse")
    for name, grad, want in zip(("dq", "dk", "dv"), grads, want_grads):
      self.assertEqual(grad.dtype, dtype)
      assert_close(self, grad, want, tol, name)

  @parameterized.parameters("tpu", "gpu")
  def test_packed_documents_match_reference(self, variant):
    """Segment ids: the kernel (forward, lse and gradients) equals the dense reference, which
    masks other documents' logits, and that equals longjax's XLA grouped softmax (itself
    checked against float64 numpy in tests/layers/landmark_test.py)."""
    b, t, n, kh, h, landmark_block = 2, 21, 4, 2, 8, 4
    q, k, v = random_inputs(7, b, t, n, kh, h, jnp.float32)
    # Laid out as the model does: a landmark (positions 3, 7, ...) belongs to the document of
    # the token before it, so no block holds a landmark without a regular key of its document.
    segments = jnp.asarray([[1] * 6 + [2] * 8 + [3] * 7, [5] * 13 + [6] * 8], jnp.int32)
    kernel = functools.partial(landmark_attention, landmark_block=landmark_block, block_q=8,
                               block_k=8, backend=variant, segment_ids=segments,
                               return_lse=True)
    reference = functools.partial(landmark_attention_reference, landmark_block=landmark_block,
                                  segment_ids=segments, return_lse=True)
    out, lse, grads = outputs_and_grads(kernel, q, k, v)
    want_out, want_lse, want_grads = outputs_and_grads(reference, q, k, v)
    tol = TOLERANCES[jnp.float32]
    assert_close(self, out, want_out, tol, "out")
    assert_close(self, lse, want_lse, tol, "lse")
    for name, grad, want in zip(("dq", "dk", "dv"), grads, want_grads):
      assert_close(self, grad, want, tol, name)
    xla = grouped_softmax_attention(q, k, v, block=landmark_block, segment_ids=segments)
    assert_close(self, want_out, xla, tol, "reference vs XLA")

  def test_closed_off_blocks_give_causal_attention_within_the_block(self):
    # Feature 0 of every query is 1 and every landmark key holds -1e4 / scale there (regular
    # keys 0): landmark logits are -1e4, so earlier blocks get no weight and each query attends
    # causally to its own block's regular tokens only -- flash attention with block segment
    # ids, landmark keys in a segment of their own.
    b, t, n, kh, h, landmark_block = 2, 18, 4, 2, 8, 4
    q, k, v = random_inputs(7, b, t, n, kh, h, jnp.float32)
    is_landmark = (jnp.arange(t) + 1) % landmark_block == 0
    q = q.at[..., 0].set(1.0)
    k = k.at[..., 0].set(jnp.where(is_landmark, -1e4 / h ** -0.5, 0.0)[None, :, None])
    blocks = jnp.broadcast_to(jnp.arange(t) // landmark_block, (b, t))
    # Each form jitted: one compiled program instead of one per op.
    want = jax.jit(lambda q, k, v: flash_attention_reference(
        q, k, v, q_segment_ids=blocks, kv_segment_ids=jnp.where(is_landmark, -1, blocks)))(
            q, k, v)
    for fn in (landmark_attention_reference,
               functools.partial(landmark_attention, block_q=8, block_k=8)):
      got = jax.jit(functools.partial(fn, landmark_block=landmark_block))(q, k, v)
      assert_close(self, got, want, 2e-5, str(fn))

  def test_rejects_bad_inputs(self):
    q, k, v = random_inputs(0, 1, 8, 2, 1, 8, jnp.float32)
    with self.assertRaisesRegex(ValueError, "whole landmark blocks"):
      landmark_attention(q, k, v, landmark_block=8, block_k=4)
    with self.assertRaisesRegex(ValueError, "landmark_block must be"):
      landmark_attention(q, k, v, landmark_block=1)
    with self.assertRaisesRegex(ValueError, "power-of-two"):
      landmark_attention(q, k, v, landmark_block=4, block_q=24, backend="gpu", interpret=False)


if __name__ == "__main__":
  absltest.main()
