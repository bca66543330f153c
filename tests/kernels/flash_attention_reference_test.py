"""The flash attention reference (pure jnp) against the definition and against longjax's ops.

`flash_attention_reference` is what the kernels are tested against (`flash_attention_test.py`),
so it is checked here against a float64 loop over (batch, head, query, key) written as plainly
as possible, and against the biases and attention of `longjax.ops`.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.flash.kernel import flash_attention_reference
from tests.kernels.attention_testing import alibi_slopes
from tests.kernels.attention_testing import assert_close
from tests.kernels.attention_testing import bias_params
from tests.kernels.attention_testing import make_positions
from tests.kernels.attention_testing import packed_segments
from tests.kernels.attention_testing import random_inputs


def naive_attention(q, k, v, *, causal, window, global_tokens, q_offset, q_ids, kv_ids, slopes,
                    cap, scale, kerple=None, q_pos=None, kv_pos=None, landmark_block=None):
  """Loops over (b, n, i, j) in float64: the definition, written as plainly as possible.

  kerple: None or (kind, r1, r2); q_pos/kv_pos: the bias's positions (None: the indices).
  landmark_block: L: keys at L-1, 2L-1, ... are landmarks, seen only from later blocks; the
  other keys only from their own block.
  """
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
          if landmark_block is not None:
            query_block, key_block = pos // landmark_block, j // landmark_block
            if (j + 1) % landmark_block == 0:
              visible = visible and key_block < query_block
            else:
              visible = visible and key_block == query_block
          if q_ids is not None:
            visible = visible and q_ids[b][i] == kv_ids[b][j]
          if not visible:
            continue
          x = scale * float(np.dot(q[b, i, n], k[b, j, n // (n_ // kh)]))
          if cap is not None:
            x = cap * np.tanh(x / cap)
          d = abs(pos - j) if q_pos is None else abs(int(q_pos[b][i]) - int(kv_pos[b][j]))
          if slopes is not None:
            x -= slopes[n] * d
          if kerple is not None:
            kind, r1, r2 = kerple
            x -= r1[n] * (np.log(1 + r2[n] * d) if kind == "kerple_log" else float(d) ** r2[n])
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
      dict(testcase_name="landmarks_offset_window", causal=True, window=6, global_tokens=0,
           q_offset=3, segments=False, alibi=False, cap=None, landmark_block=3),
  )
  def test_reference_matches_naive_loop(self, causal, window, global_tokens, q_offset, segments,
                                        alibi, cap, landmark_block=None):
    b, t, s, n, kh, h = 2, 5, 9, 4, 2, 4
    q, k, v = random_inputs(0, b, t, s, n, kh, h, jnp.float32)
    q_ids = jnp.asarray([[1, 1, 2, 2, 2], [1, 2, 3, 3, 3]]) if segments else None
    kv_ids = jnp.asarray([[1] * 4 + [2] * 5, [1] * 6 + [2] * 3]) if segments else None
    slopes = alibi_slopes(n) if alibi else None
    kwargs = dict(causal=causal, window=window, global_tokens=global_tokens, q_offset=q_offset,
                  q_segment_ids=q_ids, kv_segment_ids=kv_ids, alibi_slopes=slopes,
                  logit_soft_cap=cap, landmark_block=landmark_block)
    out, lse = flash_attention_reference(q, k, v, return_lse=True, **kwargs)
    want_out, want_lse = naive_attention(
        q, k, v, causal=causal, window=window, global_tokens=global_tokens, q_offset=q_offset,
        q_ids=None if q_ids is None else np.asarray(q_ids),
        kv_ids=None if kv_ids is None else np.asarray(kv_ids),
        slopes=None if slopes is None else np.asarray(slopes), cap=cap, scale=h ** -0.5,
        landmark_block=landmark_block)
    # Row 1 of batch 1 (segment 2) sees no key with index <= its position: a fully masked row.
    if segments:
      self.assertTrue(np.isneginf(want_lse).any())
    assert_close(self, out, want_out, 1e-5, "out")
    assert_close(self, lse, want_lse, 1e-5, "lse")

  @parameterized.parameters("kerple_log", "kerple_power")
  def test_reference_with_positions_matches_naive_loop(self, kind):
    b, t, s, n, kh, h = 2, 5, 9, 4, 2, 4
    q, k, v = random_inputs(0, b, t, s, n, kh, h, jnp.float32)
    q_pos, kv_pos = make_positions("random", 1, b, t), make_positions("random", 2, b, s)
    r1, r2 = bias_params(kind, n)
    out, lse = flash_attention_reference(
        q, k, v, causal=True, window=6, q_offset=4, bias_kind=kind, bias_params=(r1, r2),
        q_positions=q_pos, kv_positions=kv_pos, return_lse=True)
    want_out, want_lse = naive_attention(
        q, k, v, causal=True, window=6, global_tokens=0, q_offset=4, q_ids=None, kv_ids=None,
        slopes=None, cap=None, scale=h ** -0.5, kerple=(kind, np.asarray(r1), np.asarray(r2)),
        q_pos=np.asarray(q_pos), kv_pos=np.asarray(kv_pos))
    assert_close(self, out, want_out, 1e-5, "out")
    assert_close(self, lse, want_lse, 1e-5, "lse")

  def test_reference_biases_match_longjax_biases(self):
    # Positions restarted per packed document: the kernel's biases are those of AlibiBias and
    # KerpleBias (values and parameter gradients).
    from longjax.ops import attention  # pylint: disable=g-import-not-at-top
    from longjax.ops import biases  # pylint: disable=g-import-not-at-top
    from longjax.ops import masks  # pylint: disable=g-import-not-at-top
    b, t, n, kh, h = 2, 12, 4, 2, 8
    q, k, v = random_inputs(7, b, t, t, n, kh, h, jnp.float32)
    ids = packed_segments(8, b, t)
    pos = make_positions("restarted", 0, b, t, ids)
    mask = masks.AttentionMask(causal=True, q_segment_ids=ids, kv_segment_ids=ids)
    for kind in ("alibi", "kerple_log", "kerple_power"):
      params = bias_params(kind, n)
      if kind == "alibi":
        make_bias = lambda params: biases.AlibiBias(params[0], pos, pos)
      else:
        make_bias = lambda params, kind=kind: biases.KerpleBias(
            r1=params[0], r2=params[1], q_positions=pos, kv_positions=pos, kind=kind[7:])

      def loss_longjax(params, make_bias=make_bias):
        out, lse = attention.attention_reference(q, k, v, mask=mask, bias=make_bias(params),
                                                 scale=h ** -0.5)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

      def loss_kernel_reference(params, kind=kind):
        out, lse = flash_attention_reference(
            q, k, v, q_segment_ids=ids, kv_segment_ids=ids, bias_kind=kind, bias_params=params,
            q_positions=pos, kv_positions=pos, return_lse=True)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

      want, want_grads = jax.value_and_grad(loss_longjax)(params)
      got, grads = jax.value_and_grad(loss_kernel_reference)(params)
      np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=kind)
      for got_grad, want_grad in zip(grads, want_grads):
        assert_close(self, got_grad, want_grad, 1e-6, f"{kind} d(params)")

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

  def test_landmark_mask_is_the_landmark_kernels_main_softmax(self):
    # The same visibility in longjax's mask, and the normaliser of the grouped softmax that
    # kernels_pallas.landmark computes its own way (per-block statistics, no mask spec).
    from kernels_pallas import landmark_attention  # pylint: disable=g-import-not-at-top
    from longjax.ops import attention  # pylint: disable=g-import-not-at-top
    from longjax.ops import masks  # pylint: disable=g-import-not-at-top
    q, k, v = random_inputs(3, 2, 40, 40, 4, 2, 8, jnp.float32)
    out, lse = flash_attention_reference(q, k, v, landmark_block=5, return_lse=True)
    want_out, want_lse = attention.attention_reference(
        q, k, v, mask=masks.AttentionMask(causal=True, landmark_block=5), scale=8 ** -0.5)
    assert_close(self, out, want_out, 1e-6, "out")
    assert_close(self, lse, want_lse, 1e-6, "lse")
    _, main_lse = landmark_attention(q, k, v, landmark_block=5, return_lse=True)
    assert_close(self, lse, main_lse, 2e-6, "main softmax lse")


# (name, variant, dtype, shape (B, T, S, N, K, H), blocks (block_q, block_k), mask kwargs).


if __name__ == "__main__":
  absltest.main()
