"""The training-free retrieval policies' mechanism and selection rules (InfLLM, TokenSelect,
HiP, DuoAttention's statistic), at the layer level; through the model:
`retrieval_model_test.py`.

With every candidate selected, each policy equals a float64 numpy attention written from the
definition (window keys at their true distances, sinks and selected keys at distance `window`),
for prefills cut anywhere; sinks and window alone equal LM-Infinite's path; InfLLM's block keys
equal the mean of the keys a numpy double loop scores highest; each policy's selection on
hand-made keys (the block or token holding the only matching key is chosen; HiP follows keys of
decaying similarity; TokenSelect's selection cache reuses exactly when consecutive queries are
similar); the device LRU's bookkeeping on a hand-made case.

Tolerances: float32 throughout, 2e-5 absolute on O(1) outputs.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from longjax import posenc
from longjax.eval import duo
from longjax.layers import lm_infinite
from longjax.layers import retrieval as retrieval_layer
from longjax.layers import retrieval_config
from longjax.ops import block_lru
from longjax.ops import merge_attention
from longjax.ops import retrieval
from longjax.ops import retrieval_policies as policies

ATOL = 2e-5
H = 8
INV_FREQ = posenc.rope_inv_freq(H, 100.0)


def _rope(x, positions, is_key):
  del is_key
  return posenc.apply_rope(x, positions, INV_FREQ)


def _no_rotation(x, positions, is_key):
  del positions, is_key
  return x


class _Rope:
  """The `AttentionPositions` interface over `_rope`, for the LM-Infinite path."""

  def rotate(self, x, positions, *, context_length=None, is_key=False):
    del context_length
    return _rope(x, positions, is_key)

  def bias(self, q_positions, kv_positions):
    del q_positions, kv_positions


def _qkv(b, t, n, k, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((b, t, n, H), (b, t, k, H), (b, t, k, H)))


def _numpy_capped(q, k, v, *, window):
  """Every key j <= t: at its true distance when t - window < j, else at distance `window`."""
  b_, t_, n, _ = q.shape
  group = n // k.shape[2]
  index = jnp.arange(t_)
  rot = lambda x, p: np.asarray(_rope(x, jnp.broadcast_to(p, x.shape[:2]), False), np.float64)
  q_true, q_far = rot(q, index), rot(q, jnp.full((t_,), window))
  k_true, k_far = rot(k, index), rot(k, jnp.zeros((t_,), jnp.int32))
  out = np.zeros(q.shape)
  for b in range(b_):
    for i in range(t_):
      for head in range(n):
        kv = head // group
        x = np.array([(q_true[b, i, head] @ k_true[b, j, kv]) if j > i - window
                      else (q_far[b, i, head] @ k_far[b, j, kv]) for j in range(i + 1)])
        p = np.exp(x / np.sqrt(H) - np.max(x / np.sqrt(H)))
        out[b, i, head] = (p / p.sum()) @ np.asarray(v[b, :i + 1, kv], np.float64)
  return out


def _policy(name, **fields):
  defaults = {"top_k": 8, "window": 6, "sinks": 0, "block": 4, "representatives": 2,
              "reuse": 2.0, "chunk": 5}
  defaults.update(fields)
  return retrieval_config.RetrievalPolicy(name, **defaults)


_jit_decode = jax.jit(retrieval_layer.retrieval_decode,
                      static_argnames=("policy", "rotate", "impl"))


def _decode(policy, q, k, v, splits=(), rotate=_rope):
  """retrieval_decode over the whole sequence, in calls cut at `splits`: (out, cache)."""
  b, t, n, _ = q.shape
  cache = retrieval_layer.init_cache(policy, b, t, n, k.shape[2], H, jnp.float32)
  outs = []
  for lo, hi in zip((0, *splits), (*splits, t)):
    out, cache = _jit_decode(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], cache, policy,
                             rotate=rotate, impl="reference")
    outs.append(out)
  return jnp.concatenate(outs, axis=1), cache


class MechanismTest(parameterized.TestCase):

  @parameterized.parameters(
      ("tokenselect", 0, 5, ()), ("tokenselect", 3, 16, (1, 2, 9)), ("infllm", 0, 5, (7,)),
      ("infllm", 4, 16, ()), ("hip", 4, 5, (1, 2, 9)), ("hip", 0, 16, ()))
  def test_every_candidate_selected_equals_capped_attention(self, policy, sinks, chunk,
                                                            splits):
    """Sinks, remainder and a selection of every candidate: all keys, far ones at `window`;
    prefills cut anywhere and single-token steps alike."""
    b, t, n, kv = 2, 21, 4, 2
    q, k, v = _qkv(b, t, n, kv)
    policy = _policy(policy, top_k=24, sinks=sinks, chunk=chunk)
    out, _ = _decode(policy, q, k, v, splits)
    np.testing.assert_allclose(out, _numpy_capped(q, k, v, window=6), atol=ATOL)

  def test_sinks_and_window_alone_equal_lm_infinite(self):
    """The two parts with only sinks for far keys are LM-Infinite with its ceiling at the
    window."""
    b, t, n, kv, window, sinks = 1, 19, 4, 2, 5, 3
    q, k, v = _qkv(b, t, n, kv, seed=2)
    index = jnp.arange(t)
    positions = jnp.broadcast_to(index, (b, t))
    k_rot = _rope(k, positions, True)
    local = retrieval.local_attention(_rope(q, positions, False), jnp.zeros((b, window, kv, H)),
                                      jnp.zeros((b, window, kv, H)), k_rot, v, index,
                                      window=window, impl="reference")
    visible = jnp.arange(sinks)[None, :] < (index + 1 - window)[:, None]
    rows = lambda x: jnp.broadcast_to(x[:, None, :sinks], (b, t, *x[:, :sinks].shape[1:]))
    sinks_part = (rows(k), rows(v), jnp.broadcast_to(visible, (b, t, sinks)))
    far = retrieval.far_attention(retrieval.far_queries(q, window, _rope), [sinks_part],
                                  impl="reference")
    expected = lm_infinite.lm_infinite_attention(
        q, k, v, positions, segment_ids=None, window=window, global_tokens=sinks,
        ceiling=window, positional=_Rope(), scale_queries=lambda q, p: q, impl="reference",
        block_size=None)
    np.testing.assert_allclose(merge_attention([local, far])[0], expected,
                               atol=ATOL)


class InfLLMTest(absltest.TestCase):

  def test_block_keys_average_the_keys_the_window_queries_scored_highest(self):
    """r_m = sum of q_j . k_m over the `window` queries j = m..m+W-1 (true positions, summed
    over the KV head's query heads); each complete block keeps the mean of its R best keys per
    KV head."""
    b, t, n, kv, window, block, reps = 1, 26, 4, 2, 5, 4, 2
    q, k, v = _qkv(b, t, n, kv, seed=3)
    policy = _policy("infllm", window=window, block=block, representatives=reps, chunk=3)
    _, cache = _decode(policy, q, k, v, splits=(11,))
    index = jnp.arange(t)
    qr = np.asarray(_rope(q, index[None], False), np.float64)
    kr = np.asarray(_rope(k, index[None], True), np.float64)
    done = (t + 1 - window) // block  # blocks whose every key saw its `window` queries
    for g in range(cache.policy["block_keys"].shape[1]):
      for head in range(kv):
        got = np.asarray(cache.policy["block_keys"][0, g, head])
        if g >= done:
          np.testing.assert_array_equal(got, 0.0)  # not frozen yet
          continue
        scores = [sum(qr[0, j, head * 2 + i] @ kr[0, m, head] for j in range(m, m + window)
                      for i in range(2)) for m in range(g * block, (g + 1) * block)]
        best = g * block + np.argsort(scores)[::-1][:reps]
        np.testing.assert_allclose(got, np.asarray(k[0, best, head]).mean(0), atol=1e-6)

  def test_the_block_holding_the_matching_key_is_retrieved(self):
    """Queries all along u; only key 13 (block 3) points along u: its block is the one a
    query along u retrieves."""
    b, n, kv, window, block, t = 1, 2, 1, 4, 4, 28
    rng = np.random.default_rng(4)
    u = np.eye(H)[0]
    k = 0.1 * rng.normal(size=(b, t, kv, H))
    k[0, 13, 0] = 5 * u
    q = jnp.asarray(np.broadcast_to(u, (b, t, n, H)), jnp.float32)
    policy = _policy("infllm", top_k=4, window=window, block=block, representatives=1)
    _, cache = _decode(policy, q, jnp.asarray(k, jnp.float32), jnp.zeros((b, t, kv, H)),
                       rotate=_no_rotation)
    np.testing.assert_allclose(cache.policy["block_keys"][0, 3, 0], k[0, 13, 0], rtol=1e-6)
    starts, valid = policies.infllm_select(cache.policy["block_keys"], q[:, -1:],
                                           jnp.asarray([t - 1]), top_blocks=1, block=block,
                                           sinks=0, window=window)
    self.assertEqual(starts[0, 0].tolist(), [12])
    self.assertTrue(np.all(valid))


class HiPTest(absltest.TestCase):

  def test_the_block_around_the_matching_keys_is_found_among_many(self):
    """64 candidate blocks and keys that match u the more, the closer they are to token 75
    (block 37): HiP's attention locality. Pruning from 4 ranges down to single blocks (5
    levels, 4 center keys scored per level) ends on block 37."""
    block, blocks, window = 2, 66, 4
    s = block * blocks
    k = 0.1 * np.random.default_rng(8).normal(size=(1, s, 2, H))
    u = np.eye(H)[2]
    k += 3 * u * np.exp(-np.abs(np.arange(s) - 75) / 20)[None, :, None, None]
    q = jnp.asarray(np.broadcast_to(u, (1, 1, 4, H)), jnp.float32)
    starts, valid = policies.hip_select(q, jnp.asarray(k, jnp.float32), jnp.asarray([s - 1]),
                                        top_blocks=2, block=block, sinks=0, window=window)
    self.assertIn(37 * block, starts[0, 0].tolist())
    self.assertTrue(np.all(valid))
    # Blocks reaching into the window (64 and 65 here) are never candidates.
    self.assertLess(max(starts[0, 0].tolist()), (s + 1 - window) // block * block)


class BlockLRUTest(absltest.TestCase):

  def test_hits_stay_and_misses_evict_the_least_recently_used(self):
    # Slots hold blocks 7, 3, 9, -1 last read at steps 5, 2, 4, -1 (never).
    slot_block = jnp.asarray([[7, 3, 9, -1]], jnp.int32)
    last_used = jnp.asarray([[5, 2, 4, -1]], jnp.int32)
    # Step 6 selects 9 (hot), 11 and 12 (missing), and an invalid entry.
    blocks = jnp.asarray([[9, 11, 12, 0]], jnp.int32)
    valid = jnp.asarray([[True, True, True, False]])
    slots, missing, slot_block, last_used = block_lru.lookup(slot_block, last_used, blocks,
                                                             valid, jnp.int32(6))
    self.assertEqual(missing[0].tolist(), [False, True, True, False])
    self.assertEqual(slots[0, :3].tolist(), [2, 3, 1])  # the empty slot, then block 3's
    self.assertEqual(slot_block[0].tolist(), [7, 12, 9, 11])
    self.assertEqual(last_used[0].tolist(), [5, 6, 6, 6])
    hot = block_lru.fill(jnp.zeros((1, 4, 1)), slots, missing, jnp.asarray([[[1.], [2.], [3.],
                                                                            [4.]]]))
    self.assertEqual(hot[0, :, 0].tolist(), [0, 3, 0, 2])
    self.assertEqual(block_lru.read(hot, slots)[0, :3, 0].tolist(), [0, 2, 3])


class TokenSelectTest(absltest.TestCase):

  def _select(self, state, q, k, index, threshold):
    """k [B, S, K, H] -> TokenSelect's ((ids, valid), state) with sinks=1, window=2."""
    return policies.tokenselect_select(state, q, jnp.moveaxis(k, 1, 2), index,
                                       top_k=state[1].shape[-1], sinks=1, window=2,
                                       reuse_threshold=threshold)

  def test_the_matching_token_is_selected_and_sinks_and_window_are_not(self):
    s = 10
    k = 0.1 * np.random.default_rng(5).normal(size=(1, s, 1, H))
    u = np.eye(H)[1]
    k[0, 4, 0] = 5 * u
    k[0, 0, 0] = k[0, 8, 0] = 9 * u  # a sink and a window key: never candidates
    q = jnp.asarray(np.broadcast_to(u, (1, 1, 2, H)), jnp.float32)
    state = (jnp.zeros((1, 2, H)), jnp.full((1, 1), -1, jnp.int32), jnp.asarray(False))
    (ids, valid), _ = self._select(state, q, jnp.asarray(k, jnp.float32), jnp.asarray([9]),
                                   2.0)
    self.assertEqual(ids[0, 0].tolist(), [4])
    self.assertTrue(bool(valid[0, 0, 0]))

  def test_the_selection_cache_reuses_while_queries_stay_similar(self):
    s = 12
    k = jnp.asarray(np.random.default_rng(6).normal(size=(1, s, 1, H)), jnp.float32)
    e = np.eye(H)
    # Queries u, u, w, w + tiny: the 2nd reuses the cached selection, the 4th the 3rd's.
    q = np.stack([e[0], e[0], e[3], e[3] + 0.01 * e[5]])[None, :, None].repeat(2, axis=2)
    q = jnp.asarray(q, jnp.float32)
    index = jnp.arange(8, 12)
    cached = (jnp.asarray(np.broadcast_to(e[0], (1, 2, H)), jnp.float32),
              jnp.asarray([[0, 1]], jnp.int32), jnp.asarray(True))
    (fresh, _), _ = self._select(cached, q, k, index, 2.0)
    (ids, _), (last_q, last_ids, _) = self._select(cached, q, k, index, 0.9)
    np.testing.assert_array_equal(ids[0, 0], [0, 1])
    np.testing.assert_array_equal(ids[0, 1], [0, 1])
    np.testing.assert_array_equal(ids[0, 2], fresh[0, 2])
    np.testing.assert_array_equal(ids[0, 3], fresh[0, 2])
    np.testing.assert_array_equal(last_ids[0], fresh[0, 2])
    np.testing.assert_allclose(last_q[0], q[0, 3])
    # One query at a time (the decode path, which skips scoring when every row reuses).
    state = cached
    for i in range(4):
      (step_ids, _), state = self._select(state, q[:, i:i + 1], k, index[i:i + 1], 0.9)
      np.testing.assert_array_equal(step_ids[0, 0], ids[0, i])


class DuoTest(absltest.TestCase):

  def test_distant_weight_is_the_softmax_mass_before_the_window(self):
    """The calibration statistic: per retrieval head, the summed weight its queries give to
    keys j <= t - W, from the numpy softmax over the capped logits."""
    b, t, n, kv, window = 1, 17, 4, 2, 5
    q, k, v = _qkv(b, t, n, kv, seed=7)
    policy = _policy("duo", window=window, sinks=2, chunk=4)
    _, cache = _decode(policy, q, k, v, splits=(6,))
    index = jnp.arange(t)
    rot = lambda x, p: np.asarray(_rope(x, jnp.broadcast_to(p, x.shape[:2]), False), np.float64)
    q_true, q_far = rot(q, index), rot(q, jnp.full((t,), window))
    k_true, k_far = rot(k, index), rot(k, jnp.zeros((t,), jnp.int32))
    expected = np.zeros(kv)
    for i in range(t):
      for head in range(n):
        g = head // 2
        x = np.array([(q_true[0, i, head] @ k_true[0, j, g]) if j > i - window
                      else (q_far[0, i, head] @ k_far[0, j, g]) for j in range(i + 1)])
        p = np.exp(x / np.sqrt(H) - np.max(x / np.sqrt(H)))
        expected[g] += (p / p.sum())[:max(i - window + 1, 0)].sum()
    np.testing.assert_allclose(cache.policy["distant_mass"][0], expected, rtol=1e-5)

  def test_the_split_keeps_the_heads_with_the_most_distant_weight(self):
    weights = {0: np.array([0.1, 0.7]), 1: np.array([0.3, 0.05]), 3: np.array([0.2, 0.6])}
    self.assertEqual(duo.choose_split(weights, 0.5), {0: (1,), 1: (0,), 3: (1,)})
    self.assertEqual(duo.choose_split(weights, 0.01), {0: (1,), 1: (), 3: ()})
    text = retrieval_config.format_head_split({0: (1,), 1: (), 3: (0, 1)})
    self.assertEqual(text, "0:1;1:;3:0,1")
    self.assertEqual(retrieval_config.parse_head_split(text), {0: (1,), 1: (), 3: (0, 1)})


if __name__ == "__main__":
  absltest.main()
