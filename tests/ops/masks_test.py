"""Tests for longjax.ops.masks against masks built by brute force in numpy."""

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from longjax.ops.masks import AttentionMask


def numpy_mask(causal, window, q_offset, q_seg, kv_seg, t, s, global_tokens=0, landmark=None):
  """bool [B, T, S] by looping over every (query, key) pair: the definition in words."""
  batch = 1 if q_seg is None else q_seg.shape[0]
  out = np.zeros((batch, t, s), bool)
  for b in range(batch):
    for row in range(t):
      i = q_offset + row
      for j in range(s):
        ok = True
        if causal and j > i:
          ok = False
        leading = j < global_tokens  # LM-Infinite's global branch: exempt from the window
        if window is not None and not leading and (i - j >= window
                                                   or (not causal and j - i >= window)):
          ok = False
        if q_seg is not None and q_seg[b, row] != kv_seg[b, j]:
          ok = False
        if landmark is not None:  # landmarks close blocks; a block's own landmark is hidden
          if (j + 1) % landmark == 0:
            ok = ok and j // landmark < i // landmark
          else:
            ok = ok and j // landmark == i // landmark
        out[b, row, j] = ok
  return out


def packed_segments(rng, batch, length, num_docs=3):
  """Sorted random document ids 1..num_docs with a padding tail of segment 0."""
  ids = np.sort(rng.integers(1, num_docs + 1, size=(batch, length)), axis=1)
  pad = rng.integers(0, length // 3 + 1, size=batch)
  for b in range(batch):
    ids[b, length - pad[b]:] = 0
  return ids.astype(np.int32)


def make_mask(rng, causal, window, q_offset, segments, batch, t, s, global_tokens=0,
              landmark=None):
  q_seg = kv_seg = None
  if segments:
    # Queries are the last T of the S key positions (as in decoding), so their ids match.
    kv_seg = packed_segments(rng, batch, s)
    q_seg = kv_seg[:, max(s - t, 0):][:, :t]
    q_seg = np.pad(q_seg, ((0, 0), (0, t - q_seg.shape[1])))
  mask = AttentionMask(causal=causal, window=window, q_offset=q_offset,
                       global_tokens=global_tokens, landmark_block=landmark,
                       q_segment_ids=None if q_seg is None else jnp.asarray(q_seg),
                       kv_segment_ids=None if kv_seg is None else jnp.asarray(kv_seg))
  return mask, numpy_mask(causal, window, q_offset, q_seg, kv_seg, t, s, global_tokens,
                          landmark)


def grid(length, block):
  return range(0, -(-length // block) * block, block)


class AttentionMaskTest(parameterized.TestCase):

  # (window, global_tokens): global tokens exist only with a window.
  @parameterized.product(causal=(True, False), window_and_global=((None, 0), (5, 0), (5, 3)),
                         q_offset=(0, 7), segments=(False, True))
  def test_blocks_assemble_to_brute_force(self, causal, window_and_global, q_offset, segments):
    window, global_tokens = window_and_global
    t, s, cq, ckv = 30, 45, 8, 16  # lengths are not multiples of the blocks
    for landmark in (None, 3, 20) if causal else (None,):  # landmark blocks need causal
      mask, expected = make_mask(np.random.default_rng(0), causal, window, q_offset, segments,
                                 2, t, s, global_tokens, landmark)
      rows = []
      for q_start in grid(t, cq):
        blocks = [mask.block(q_start, cq, kv_start, ckv, q_length=t, kv_length=s)
                  for kv_start in grid(s, ckv)]
        rows.append(jnp.concatenate(blocks, axis=-1))
      assembled = np.asarray(jnp.concatenate(rows, axis=-2))[:, 0]
      # Padded rows and keys are invisible.
      self.assertFalse(assembled[:, t:].any())
      self.assertFalse(assembled[:, :, s:].any())
      np.testing.assert_array_equal(np.broadcast_to(assembled[:, :t, :s], expected.shape),
                                    expected)
      np.testing.assert_array_equal(
          np.broadcast_to(np.asarray(mask.dense(t, s))[:, 0], expected.shape), expected)

  @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
  @hypothesis.given(causal=st.booleans(), window=st.sampled_from([None, 1, 3, 9]),
                    global_tokens=st.sampled_from([0, 1, 5, 13]),
                    q_offset=st.integers(0, 20), segments=st.booleans(),
                    t=st.integers(1, 24), s=st.integers(1, 24), cq=st.sampled_from([4, 8]),
                    ckv=st.sampled_from([4, 8]), seed=st.integers(0, 2**16),
                    landmark=st.sampled_from([None, 2, 5]))
  def test_skipping_is_conservative(self, causal, window, global_tokens, q_offset, segments, t,
                                    s, cq, ckv, seed, landmark):
    global_tokens = global_tokens if window is not None else 0
    landmark = landmark if causal else None
    mask, expected = make_mask(np.random.default_rng(seed), causal, window, q_offset, segments,
                               2, t, s, global_tokens, landmark)
    padded = np.zeros((expected.shape[0], len(grid(t, cq)) * cq, len(grid(s, ckv)) * ckv), bool)
    padded[:, :t, :s] = expected
    lengths = dict(q_length=t, kv_length=s)
    for q_start in grid(t, cq):
      kv_lo, kv_hi = mask.kv_index_range(q_start, cq, **lengths)
      visible_keys = np.flatnonzero(padded[:, q_start:q_start + cq].any(axis=(0, 1)))
      if visible_keys.size:
        self.assertLessEqual(int(kv_lo), visible_keys.min())
        self.assertGreater(int(kv_hi), visible_keys.max())
      # The union of the finer ranges (leading keys, window) still holds every visible key.
      covered = np.zeros(padded.shape[2], bool)
      for lo, hi in mask.kv_index_ranges(q_start, cq, **lengths):
        covered[int(lo):int(hi)] = True
      self.assertTrue(covered[visible_keys].all(), (q_start, visible_keys, covered))
      for kv_start in grid(s, ckv):
        nonempty = padded[:, q_start:q_start + cq, kv_start:kv_start + ckv].any()
        if nonempty:
          self.assertTrue(mask.block_may_be_nonempty(q_start, cq, kv_start, ckv, **lengths))
    for kv_start in grid(s, ckv):
      q_lo, q_hi = mask.q_index_range(kv_start, ckv, **lengths)
      visible_rows = np.flatnonzero(padded[:, :, kv_start:kv_start + ckv].any(axis=(0, 2)))
      if visible_rows.size:
        self.assertLessEqual(int(q_lo), visible_rows.min())
        self.assertGreater(int(q_hi), visible_rows.max())

  @parameterized.parameters(0, 5, 16)
  def test_strictly_upper_causal_blocks_are_skipped(self, q_offset):
    mask = AttentionMask(causal=True, q_offset=q_offset)
    c, n = 8, 64
    for q_start in range(0, n, c):
      for kv_start in range(0, n, c):
        upper = kv_start > q_offset + q_start + c - 1  # first key after the block's last query
        got = bool(mask.block_may_be_nonempty(q_start, c, kv_start, c, q_length=n, kv_length=n))
        self.assertEqual(got, not upper, (q_start, kv_start))

  def test_blocks_left_of_window_are_skipped(self):
    mask = AttentionMask(causal=True, window=8)
    self.assertFalse(mask.block_may_be_nonempty(32, 8, 16, 8, q_length=64, kv_length=64))
    self.assertTrue(mask.block_may_be_nonempty(32, 8, 24, 8, q_length=64, kv_length=64))

  def test_lambda_shape_matches_brute_force(self):
    # LM-Infinite's Lambda mask by hand: query i sees keys j <= i with j < 2 or i - j < 3.
    mask = AttentionMask(causal=True, window=3, global_tokens=2)
    expected = np.array([[j <= i and (j < 2 or i - j < 3) for j in range(8)] for i in range(8)])
    np.testing.assert_array_equal(np.asarray(mask.dense(8, 8))[0, 0], expected)
    self.assertEqual(expected[7].tolist(), [1, 1, 0, 0, 0, 1, 1, 1])

  def test_blocks_between_leading_keys_and_window_are_skipped(self):
    mask = AttentionMask(causal=True, window=8, global_tokens=4)
    lengths = dict(q_length=64, kv_length=64)
    self.assertTrue(mask.block_may_be_nonempty(48, 8, 0, 8, **lengths))   # leading keys
    self.assertFalse(mask.block_may_be_nonempty(48, 8, 16, 8, **lengths))  # in between
    self.assertTrue(mask.block_may_be_nonempty(48, 8, 40, 8, **lengths))  # the window
    (g_lo, g_hi), (lo, hi) = mask.kv_index_ranges(48, 8, **lengths)
    self.assertEqual((int(g_lo), int(g_hi), int(lo), int(hi)), (0, 4, 41, 56))
    # Key block 0 holds leading keys: every later row may see it, the window notwithstanding.
    self.assertEqual(tuple(map(int, mask.q_index_range(0, 8, **lengths))), (0, 64))
    self.assertEqual(tuple(map(int, mask.q_index_range(16, 8, **lengths))), (16, 31))

  def test_disjoint_segments_are_skipped(self):
    ids = jnp.asarray([[1] * 8 + [2] * 8], jnp.int32)
    mask = AttentionMask(causal=False, q_segment_ids=ids, kv_segment_ids=ids)
    self.assertFalse(mask.block_may_be_nonempty(8, 8, 0, 8))
    self.assertTrue(mask.block_may_be_nonempty(8, 8, 8, 8))

  def test_traced_offset(self):
    @jax.jit
    def dense(offset):
      return AttentionMask(q_offset=offset).dense(4, 10)

    np.testing.assert_array_equal(np.asarray(dense(jnp.int32(6)))[0, 0],
                                  numpy_mask(True, None, 6, None, None, 4, 10)[0])

  def test_invalid_specs(self):
    with self.assertRaisesRegex(ValueError, "window"):
      AttentionMask(window=0)
    with self.assertRaisesRegex(ValueError, "global_tokens=2 needs a window"):
      AttentionMask(global_tokens=2)
    with self.assertRaisesRegex(ValueError, "global_tokens"):
      AttentionMask(window=4, global_tokens=-1)
    with self.assertRaisesRegex(ValueError, "landmark_block must be an int >= 2 .* got 1"):
      AttentionMask(landmark_block=1)
    with self.assertRaisesRegex(ValueError, "landmark_block=4 needs causal=True"):
      AttentionMask(causal=False, landmark_block=4)
    ids = jnp.zeros((1, 4), jnp.int32)
    with self.assertRaisesRegex(ValueError, "together"):
      AttentionMask(q_segment_ids=ids).validate(1, 4, 4)
    with self.assertRaisesRegex(ValueError, "kv_segment_ids"):
      AttentionMask(q_segment_ids=ids, kv_segment_ids=ids).validate(1, 4, 5)


if __name__ == "__main__":
  absltest.main()
