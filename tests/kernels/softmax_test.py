"""The shared softmax numerics against softmax over all keys at once, in float64 numpy.

The merge of partial results is checked against its definition: attention over the
concatenation of the parts' keys, computed densely, with parts that see nothing (lse = -inf,
out = 0) for some rows and for every row. The online update is checked the same way, block by
block, and the dense tail against a float64 loop.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import softmax

# f32: summation order only. bf16 inputs: outs rounded to bf16 (2^-8 ~ 4e-3) before merging;
# the online update also rounds exp(s - m) to bf16 for the p v matmul.
TOLERANCES = {"float32": 2e-6, "bfloat16": 2e-2}


def dense_softmax(logits, visible, values):
  """float64: out [R, H] and lse [R] of softmax(logits where visible) @ values; 0, -inf if none.

  logits, visible [R, S]; values [S, H].
  """
  logits = np.where(visible, np.asarray(logits, np.float64), -np.inf)
  out = np.zeros((logits.shape[0], values.shape[1]))
  lse = np.full(logits.shape[0], -np.inf)
  for r in range(logits.shape[0]):
    if visible[r].any():
      m = logits[r][visible[r]].max()
      w = np.exp(logits[r] - m)
      lse[r] = m + np.log(w.sum())
      out[r] = (w / w.sum()) @ np.asarray(values, np.float64)
  return out, lse


def random_parts(seed, rows, sizes, h):
  """Logits [R, S], visibility [R, S], values [S, H] over keys cut into parts of `sizes`.

  Part 1 is hidden from every row, rows 0 and 1 see nothing at all, row 2 sees only part 0.
  """
  rng = np.random.default_rng(seed)
  s = sum(sizes)
  logits = rng.normal(size=(rows, s)) * 3
  visible = rng.random((rows, s)) < 0.7
  starts = np.cumsum([0, *sizes])
  visible[:, starts[1]:starts[2]] = False
  visible[:2] = False
  visible[2, starts[1]:] = False
  visible[2, 0] = True
  return logits, visible, rng.normal(size=(s, h)), starts


def assert_close(got, want, tol, what):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=what)
  np.testing.assert_array_equal(np.isnan(got), False, err_msg=what)
  finite = np.isfinite(want)
  np.testing.assert_allclose(np.where(finite, got, 0), np.where(finite, want, 0), atol=tol,
                             rtol=tol, err_msg=what)


class MergeTest(parameterized.TestCase):

  @parameterized.product(dtype=("float32", "bfloat16"), axis=(0, 1))
  def test_merge_equals_softmax_over_the_concatenated_keys(self, dtype, axis):
    rows, h, sizes = 6, 5, (7, 4, 9, 1)
    logits, visible, values, starts = random_parts(0, rows, sizes, h)
    parts = [dense_softmax(logits[:, a:b], visible[:, a:b], values[a:b])
             for a, b in zip(starts[:-1], starts[1:])]
    outs = np.stack([o for o, _ in parts], axis=axis)  # [P, R, H] or [R, P, H]
    lses = np.stack([lse for _, lse in parts], axis=axis)
    out, lse = jax.jit(softmax.merge_partials, static_argnums=2)(
        jnp.asarray(outs, dtype), jnp.asarray(lses, jnp.float32), axis)
    self.assertEqual((out.dtype, lse.dtype), (jnp.float32, jnp.float32))
    want_out, want_lse = dense_softmax(logits, visible, values)
    assert_close(out, want_out, TOLERANCES[dtype], "out")
    assert_close(lse, want_lse, 2e-6, "lse")
    np.testing.assert_array_equal(out[:2], 0.0)  # rows no part saw

  def test_all_parts_empty(self):
    out, lse = softmax.merge_partials(jnp.zeros((3, 2, 4)), jnp.full((3, 2), -jnp.inf))
    np.testing.assert_array_equal(out, 0.0)
    self.assertTrue(np.isneginf(lse).all())

  def test_merge_attention_layout_and_gradients(self):
    # [B, T, N, H] outs with [B, N, T] lses; the second part sees nothing for query row 0. The
    # gradients through the merge are those of the dense softmax over both parts' keys.
    b, t, n, h, s1, s2 = 2, 3, 2, 4, 5, 6
    keys = jax.random.split(jax.random.key(0), 2)
    logits = jax.random.normal(keys[0], (b, n, t, s1 + s2))
    values = jax.random.normal(keys[1], (b, s1 + s2, 1, h))
    visible = jnp.ones((t, s1 + s2), bool).at[0, s1:].set(False)

    def attend(logits, values, lo, hi):
      return softmax.masked_softmax_attention(logits[..., lo:hi], visible[:, lo:hi],
                                              values[:, lo:hi])

    def merged(logits, values):
      out, lse = softmax.merge_attention([attend(logits, values, 0, s1),
                                          attend(logits, values, s1, s1 + s2)])
      return out.sum() + jnp.sin(lse).sum(), (out, lse)

    def dense(logits, values):
      out, lse = attend(logits, values, 0, s1 + s2)
      return out.sum() + jnp.sin(lse).sum(), (out, lse)

    got_grads, (out, lse) = jax.grad(merged, (0, 1), has_aux=True)(logits, values)
    want_grads, (want_out, want_lse) = jax.grad(dense, (0, 1), has_aux=True)(logits, values)
    self.assertEqual((out.shape, lse.shape), ((b, t, n, h), (b, n, t)))
    checks = ((out, want_out, "out"), (lse, want_lse, "lse"),
              (got_grads[0], want_grads[0], "d logits"), (got_grads[1], want_grads[1], "d v"))
    for got, want, what in checks:
      assert_close(got, want, 2e-6, what)


class DenseAndOnlineTest(parameterized.TestCase):

  def test_masked_softmax_attention_matches_a_loop(self):
    # Grouped heads (N = 4 query heads on K = 2 kv heads); rows 0 and 1 see nothing.
    b, n, nk, t, h = 2, 4, 2, 6, 3
    logits, visible, _, _ = random_parts(1, t, (5, 2, 3), h)
    logits = np.stack([logits + i for i in range(b * n)]).reshape(b, n, t, -1)
    values = np.random.default_rng(2).normal(size=(b, logits.shape[-1], nk, h))
    out, lse = softmax.masked_softmax_attention(
        jnp.asarray(logits, jnp.float32), jnp.asarray(visible), jnp.asarray(values, jnp.float32))
    self.assertEqual((out.shape, lse.shape), ((b, t, n, h), (b, n, t)))
    for bi in range(b):
      for ni in range(n):
        want_out, want_lse = dense_softmax(logits[bi, ni], visible, values[bi, :, ni // 2])
        assert_close(out[bi, :, ni], want_out, 2e-6, f"out {bi} {ni}")
        assert_close(lse[bi, ni], want_lse, 2e-6, f"lse {bi} {ni}")

  @parameterized.parameters("float32", "bfloat16")
  def test_online_update_over_blocks_equals_dense(self, dtype):
    # Blocks of 4 keys in the [B, K, G, Cq, ...] layout; block 1 is hidden from every row.
    rows, h, sizes = 6, 5, (4, 4, 4, 4)
    logits, visible, values, starts = random_parts(3, rows, sizes, h)
    state = softmax.online_softmax_init((1, 1, 1, rows), h)
    for a, b in zip(starts[:-1], starts[1:]):
      s = jnp.asarray(np.where(visible[:, a:b], logits[:, a:b], -np.inf), jnp.float32)
      state = softmax.online_softmax_update(state, s[None, None, None],
                                            jnp.asarray(values[a:b], dtype)[None, None])
    out, lse = softmax.online_softmax_finish(state)
    want_out, want_lse = dense_softmax(logits, visible, values)
    assert_close(out[0, 0, 0], want_out, TOLERANCES[dtype], "out")
    assert_close(lse[0, 0, 0], want_lse, 2e-6, "lse")


if __name__ == "__main__":
  absltest.main()
