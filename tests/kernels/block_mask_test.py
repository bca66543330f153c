"""Block skipping of the flash kernels: the visited blocks are exactly the non-empty ones.

The kernels choose their blocks only through `block_mask.kv_step_to_block` (forward and dq, both
variants) and `block_mask.q_step_to_block` / `q_block_range` (dk/dv). Evaluated here in plain
Python, they are compared with a brute-force scan of the dense mask: every block with a visible
entry is visited exactly once, no empty block is visited, and the static grid extents bound the
visit counts for every query offset. `flash_attention_test` checks that the kernels never read
skipped blocks (NaN-filled keys leave the results unchanged).
"""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from kernels_pallas import block_mask
from kernels_pallas.block_mask import FlashSpec


def dense_visibility(spec: FlashSpec, q_offset: int) -> np.ndarray:
  """bool [Tp, Sp]: the index rules, entry by entry, over the padded lengths."""
  tp = spec.num_q_blocks * spec.block_q
  sp = spec.num_kv_blocks * spec.block_k
  i = np.arange(tp)[:, None] + q_offset
  j = np.arange(sp)[None, :]
  visible = (np.arange(tp)[:, None] < spec.q_length) & (j < spec.kv_length)
  if spec.causal:
    visible &= j <= i
  if spec.window is not None:
    near = (i - j < spec.window) if spec.causal else (np.abs(i - j) < spec.window)
    visible &= near | (j < spec.global_tokens)
  return visible


def nonempty_blocks(spec: FlashSpec, q_offset: int) -> set[tuple[int, int]]:
  visible = dense_visibility(spec, q_offset)
  return {(qi, kj)
          for qi in range(spec.num_q_blocks) for kj in range(spec.num_kv_blocks)
          if visible[qi * spec.block_q:(qi + 1) * spec.block_q,
                     kj * spec.block_k:(kj + 1) * spec.block_k].any()}


def forward_visits(spec: FlashSpec, q_offset: int) -> list[tuple[int, int]]:
  """(query block, kv block) pairs the forward / dq kernels compute, in order."""
  visits = []
  for qi in range(spec.num_q_blocks):
    for step in range(block_mask.kv_steps_bound(spec)):
      block, valid = block_mask.kv_step_to_block(spec, qi, step, q_offset)
      assert 0 <= block < spec.num_kv_blocks  # also for skipped steps: a real block to re-map to
      if valid:
        visits.append((qi, block))
  return visits


def dkv_visits(spec: FlashSpec, q_offset: int) -> list[tuple[int, int]]:
  """(query block, kv block) pairs the dk/dv kernels compute, for one query head."""
  visits = []
  for kj in range(spec.num_kv_blocks):
    for step in range(block_mask.q_steps_bound(spec)):
      block, valid = block_mask.q_step_to_block(spec, kj, step, q_offset)
      assert 0 <= block < spec.num_q_blocks
      if valid:
        visits.append((block, kj))
  return visits


def _specs():
  """A spread of masks, lengths (padded or not) and block shapes."""
  masks = [dict(causal=True, window=None, global_tokens=0),
           dict(causal=False, window=None, global_tokens=0),
           dict(causal=True, window=5, global_tokens=0),
           dict(causal=True, window=17, global_tokens=0),
           dict(causal=False, window=9, global_tokens=0),
           dict(causal=True, window=6, global_tokens=3),
           dict(causal=True, window=4, global_tokens=20),
           dict(causal=False, window=7, global_tokens=10)]
  shapes = [(40, 40, 8, 8), (37, 53, 8, 16), (16, 64, 16, 8), (5, 70, 8, 16)]
  for mask, (t, s, bq, bk) in itertools.product(masks, shapes):
    yield FlashSpec(q_length=t, kv_length=s, block_q=bq, block_k=bk, scale=1.0, **mask)


class BlockMaskTest(parameterized.TestCase):

  def test_visited_blocks_are_exactly_the_nonempty_ones(self):
    checked = 0
    for spec in _specs():
      for q_offset in (0, 3, 30, 65):
        want = nonempty_blocks(spec, q_offset)
        for name, visits in (("forward", forward_visits(spec, q_offset)),
                             ("dkv", dkv_visits(spec, q_offset))):
          msg = f"{name} {spec} q_offset={q_offset}"
          self.assertLen(set(visits), len(visits), "a block visited twice: " + msg)
          self.assertEqual(set(visits), want, msg)
        checked += 1
    self.assertEqual(checked, 8 * 4 * 4)

  def test_windows_skip_most_blocks(self):
    # The point of skipping: with a window the work grows with T * window, not T * S.
    spec = FlashSpec(causal=True, window=64, global_tokens=0, q_length=4096, kv_length=4096,
                     block_q=128, block_k=128, scale=1.0)
    # 128 rows + a window of 64 span 191 keys: 3 blocks (of 32) for some query offsets.
    self.assertEqual(block_mask.kv_steps_bound(spec), 3)
    self.assertEqual(block_mask.q_steps_bound(spec), 3)
    self.assertEqual(max(len(forward_visits(spec, offset)) for offset in (0, 62, 100)), 94)
    self.assertLen(forward_visits(spec, 0), 32 + 31)
    causal = FlashSpec(causal=True, window=None, global_tokens=0, q_length=4096,
                       kv_length=4096, block_q=128, block_k=128, scale=1.0)
    self.assertLen(forward_visits(causal, 0), 32 * 33 // 2)

  def test_skipped_steps_repeat_the_last_block(self):
    # The TPU pipeline copies nothing when consecutive steps name the same block.
    spec = FlashSpec(causal=True, window=None, global_tokens=0, q_length=64, kv_length=64,
                     block_q=16, block_k=16, scale=1.0)
    blocks = [block_mask.kv_step_to_block(spec, 1, step, 0) for step in range(4)]
    self.assertEqual(blocks, [(0, True), (1, True), (1, False), (1, False)])

  def test_traced_and_python_ints_agree(self):
    spec = FlashSpec(causal=True, window=6, global_tokens=3, q_length=37, kv_length=53,
                     block_q=8, block_k=16, scale=1.0)
    traced = jax.jit(lambda qi, step, offset: block_mask.kv_step_to_block(spec, qi, step,
                                                                            offset))
    traced_t = jax.jit(lambda kj, step, offset: block_mask.q_step_to_block(spec, kj, step,
                                                                             offset))
    for qi, step, offset in itertools.product(range(5), range(3), (0, 7, 40)):
      self.assertEqual(tuple(int(x) for x in traced(qi, step, offset)),
                       tuple(int(x) for x in block_mask.kv_step_to_block(spec, qi, step,
                                                                          offset)))
    for kj, step, offset in itertools.product(range(4), range(5), (0, 7, 40)):
      self.assertEqual(tuple(int(x) for x in traced_t(kj, step, offset)),
                       tuple(int(x) for x in block_mask.q_step_to_block(spec, kj, step,
                                                                         offset)))


if __name__ == "__main__":
  absltest.main()
