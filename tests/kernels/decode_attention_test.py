"""Decode attention kernels (interpret mode) against the last rows of full attention.

The independent check is `flash_attention_reference` run over each batch element's valid
prefix with queries for every position, of which decoding must reproduce the last T rows. Both
kernel variants (Mosaic-TPU-style and Triton-style) run in the Pallas interpreter on CPU.
Lowering for real TPUs and GPUs is in `decode_attention_lowering_test.py`.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import block_mask
from kernels_pallas.decode.kernel import decode_attention
from kernels_pallas.decode.kernel import decode_attention_reference
from kernels_pallas.softmax import merge_partials
from kernels_pallas.flash.kernel import flash_attention_reference
from tests.kernels.attention_testing import assert_close

# Relative to the largest magnitude of the compared array. f32: only the summation order
# differs. bf16: probabilities are rounded to bf16 before the p v matmul, relative to a running
# (kernel) or final (reference) maximum: a few bf16 ulps (2^-8 ~ 4e-3).
TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}
_S, _BLOCK = 70, 16  # a cache that needs padding to the block, with lengths off the block


def jitted(fn, **kwargs):
  """fn with its keyword arguments fixed, jitted: one compilation instead of op-by-op dispatch."""
  return jax.jit(functools.partial(fn, **kwargs))


def full_attention_last_rows(rng, q, k, v, lengths, kwargs):
  """Causal attention over the whole cache with fresh queries at every position, except that
  batch element b has q[b] at positions L_b - T .. L_b - 1; returns those rows (f32), shaped
  like decode's (out, lse). By causality they see only the valid prefix [0, L_b)."""
  b, t = q.shape[:2]
  q_full = rng.normal(size=(b,) + k.shape[1:2] + q.shape[2:]).astype(np.float32)
  for i, length in enumerate(lengths):
    q_full[i, length - t:length] = np.asarray(q[i], np.float32)
  out, lse = jitted(flash_attention_reference, causal=True, return_lse=True, **kwargs)(
      jnp.asarray(q_full), k.astype(jnp.float32), v.astype(jnp.float32))
  out, lse = np.asarray(out), np.asarray(lse)  # sliced in numpy: no per-slice compilation
  return (np.stack([out[i, n - t:n] for i, n in enumerate(lengths)]),
          np.stack([lse[i, :, n - t:n] for i, n in enumerate(lengths)]))


def random_cache(seed, b, t, n, nk, h, dtype, s=_S):
  rng = np.random.default_rng(seed)
  shapes = ((b, t, n, h), (b, s, nk, h), (b, s, nk, h))
  return rng, tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


def alibi_slopes(num_heads):
  return 2.0 ** -(8.0 * jnp.arange(1, num_heads + 1, dtype=jnp.float32) / num_heads)


# (name, variant, dtype, T, N, K, cache lengths, num_splits, mask kwargs). GQA ratio N / K in
# 1, 2, 4; lengths are per batch element except where a single int is given, none a multiple of
# the block; num_splits None is the default (1 in the interpreter).
_CASES = (
    ("causal_t1_mha", "gpu", jnp.float32, 1, 2, 2, (37, 61), 1, dict()),
    ("causal_t4_gqa4", "tpu", jnp.float32, 4, 4, 1, (37, 61), 3, dict()),
    ("causal_t1_gqa2_bf16", "gpu", jnp.bfloat16, 1, 4, 2, (70, 9), 3, dict()),
    ("causal_t4_gqa2_bf16_scalar_length", "tpu", jnp.bfloat16, 4, 4, 2, 45, 1, dict()),
    ("window_t1_gqa4", "tpu", jnp.float32, 1, 8, 2, (50, 21), 3, dict(window=9)),
    ("window_t4_gqa2", "gpu", jnp.float32, 4, 4, 2, (50, 21), 1, dict(window=9)),
    ("window_global_t1_mha", "gpu", jnp.float32, 1, 2, 2, (66, 30), 3,
     dict(window=7, global_tokens=3)),
    ("window_global_t4_gqa4_bf16", "tpu", jnp.bfloat16, 4, 4, 1, (66, 30), 1,
     dict(window=7, global_tokens=20)),
    ("alibi_t1_gqa2", "tpu", jnp.float32, 1, 4, 2, (37, 61), 1, dict(alibi=True)),
    ("alibi_t4_mha_bf16", "gpu", jnp.bfloat16, 4, 2, 2, (37, 61), 3, dict(alibi=True)),
    ("soft_cap_t1_gqa4", "gpu", jnp.float32, 1, 4, 1, (37, 61), None,
     dict(logit_soft_cap=1.0)),
    ("soft_cap_t4_gqa2", "tpu", jnp.float32, 4, 4, 2, (37, 61), 3, dict(logit_soft_cap=2.0)),
    ("everything_t4_gqa2_bf16", "gpu", jnp.bfloat16, 4, 4, 2, (58, 43), 3,
     dict(window=10, global_tokens=2, alibi=True, logit_soft_cap=3.0)),
    ("everything_t1_gqa4", "tpu", jnp.float32, 1, 8, 2, (58, 43), 1,
     dict(window=10, global_tokens=2, alibi=True, logit_soft_cap=3.0)),
)


class DecodeAttentionTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name=f"{name}_{variant}", variant=variant, dtype=dtype, t=t, n=n, nk=nk,
           lengths=lengths, num_splits=num_splits, case_kwargs=case_kwargs)
      for name, variant, dtype, t, n, nk, lengths, num_splits, case_kwargs in _CASES)
  def test_matches_last_rows_of_full_attention(self, variant, dtype, t, n, nk, lengths,
                                               num_splits, case_kwargs):
    b = 1 if isinstance(lengths, int) else len(lengths)
    rng, (q, k, v) = random_cache(t * 10 + n, b, t, n, nk, 8, dtype)
    kwargs = dict(case_kwargs)
    if kwargs.pop("alibi", False):
      kwargs["alibi_slopes"] = alibi_slopes(n)
    cache_length = lengths if isinstance(lengths, int) else jnp.asarray(lengths, jnp.int32)
    want_out, want_lse = full_attention_last_rows(
        rng, q, k, v, [lengths] if isinstance(lengths, int) else lengths, kwargs)
    # bf16 kernels are compared with f32 attention of the same (rounded) inputs.
    ref_out, ref_lse = jitted(decode_attention_reference, cache_length=cache_length,
                              return_lse=True, **kwargs)(
                                  *(x.astype(jnp.float32) for x in (q, k, v)))
    assert_close(self, ref_out, want_out, 2e-5, "reference out")
    assert_close(self, ref_lse, want_lse, 2e-5, "reference lse")
    out, lse = jitted(decode_attention, cache_length=cache_length, block_k=_BLOCK,
                      num_splits=num_splits, backend=variant, return_lse=True, **kwargs)(q, k, v)
    self.assertEqual(out.dtype, dtype)
    self.assertEqual(lse.dtype, jnp.float32)
    tol = TOLERANCES[dtype]
    assert_close(self, out, want_out, tol, "out")
    assert_close(self, lse, want_lse, tol, "lse")

  @parameterized.parameters("gpu", "tpu")
  def test_explicit_offset_matches_flash_semantics(self, variant):
    # Queries at 20..22 of a cache with 30 valid entries (e.g. re-scoring drafted tokens) see
    # keys <= their index, exactly as flash_attention with the same q_offset; a row at i < 0
    # (batch 1) sees nothing. The default block size and partition count are used.
    rng, (q, k, v) = random_cache(7, 2, 3, 4, 2, 8, jnp.float32)
    del rng
    out, lse = jitted(decode_attention, cache_length=30, q_offset=jnp.asarray([20, -1]),
                      window=6, backend=variant, return_lse=True)(q, k, v)
    want_out, want_lse = jitted(flash_attention_reference, q_offset=20, window=6,
                                return_lse=True)(q[:1], k[:1, :30], v[:1, :30])
    assert_close(self, out[:1], want_out, 2e-5, "out")
    assert_close(self, lse[:1], want_lse, 2e-5, "lse")
    np.testing.assert_array_equal(out[1, 0], 0.0)
    self.assertTrue(np.isneginf(lse[1, :, 0]).all())
    self.assertTrue(np.isfinite(lse[1, :, 1:]).all())

  @parameterized.parameters("gpu", "tpu")
  def test_skipped_blocks_are_never_read(self, variant):
    # Queries at 44..47 (cache length 48) with a window of 8 and 2 global tokens see keys 0..1
    # and 37..47: with blocks of 8, blocks 1..3 and 6..8 are invisible. Filled with NaN, they
    # would poison the output (0 * NaN = NaN) if a partition loaded and computed them.
    rng, (q, k, v) = random_cache(8, 1, 4, 4, 2, 8, jnp.float32, s=72)
    del rng
    poison = np.zeros((1, 72, 1, 1), bool)
    poison[:, 8:32] = poison[:, 48:] = True
    fn = jitted(decode_attention, cache_length=48, window=8, global_tokens=2, block_k=8,
                num_splits=2, backend=variant, return_lse=True)
    want_out, want_lse = fn(q, k, v)
    out, lse = fn(q, jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v))
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(lse, want_lse)

  def test_changing_cache_length_does_not_recompile(self):
    rng, (q, k, v) = random_cache(5, 2, 1, 4, 2, 8, jnp.float32)
    del rng
    traces = []

    @jax.jit
    def step(cache_length):
      traces.append(cache_length)
      return decode_attention(q, k, v, cache_length=cache_length, window=20, block_k=_BLOCK,
                              num_splits=2, backend="tpu")

    reference = jax.jit(lambda cache_length: decode_attention_reference(
        q, k, v, cache_length=cache_length, window=20))
    for lengths in ((3, 17), (40, 70), (69, 1)):
      cache_length = jnp.asarray(lengths, jnp.int32)
      want = reference(cache_length)
      assert_close(self, step(cache_length), want, 2e-5, f"lengths {lengths}")
    self.assertLen(traces, 1)
    self.assertEqual(step._cache_size(), 1)  # pylint: disable=protected-access

  @parameterized.parameters("gpu", "tpu")
  def test_splits_merge_to_a_single_split(self, variant):
    rng, (q, k, v) = random_cache(9, 2, 2, 4, 1, 8, jnp.float32)
    del rng
    def fn(num_splits):
      return jitted(decode_attention, cache_length=jnp.asarray([70, 33]), window=40,
                    global_tokens=5, block_k=8, num_splits=num_splits, backend=variant,
                    return_lse=True)(q, k, v)

    one = fn(1)
    for num_splits in (2, 5):
      for got, want, name in zip(fn(num_splits), one, ("out", "lse")):
        assert_close(self, got, want, 2e-6, f"{name}, {num_splits} splits")

  def test_merge_partials_identity(self):
    # Attention over keys [0, 30) and [30, 50), merged by lse, is attention over [0, 50); an
    # empty third part (lse = -inf, out = 0) changes nothing.
    rng, (q, k, v) = random_cache(10, 2, 3, 4, 2, 8, jnp.float32, s=50)
    del rng
    attend = jitted(flash_attention_reference, causal=False, return_lse=True)
    parts = [attend(q, k[:, :30], v[:, :30]), attend(q, k[:, 30:], v[:, 30:])]
    parts.append((jnp.zeros_like(parts[0][0]), jnp.full_like(parts[0][1], -jnp.inf)))
    # out [B, T, N, H] and lse [B, N, T]: put the partition axis first and lse like out.
    outs = jnp.stack([o for o, _ in parts])
    lses = jnp.stack([lse.transpose(0, 2, 1) for _, lse in parts])
    out, lse = jax.jit(merge_partials)(outs, lses)
    want_out, want_lse = attend(q, k, v)
    assert_close(self, out, want_out, 2e-6, "out")
    assert_close(self, lse.transpose(0, 2, 1), want_lse, 2e-6, "lse")
    # All parts empty: zeros and -inf, no NaN.
    out, lse = merge_partials(outs[2:], lses[2:])
    np.testing.assert_array_equal(out, 0.0)
    self.assertTrue(np.isneginf(lse).all())

  def test_partitions_visit_exactly_the_visible_blocks(self):
    # Python-int block arithmetic, checked against a dense mask over random configurations:
    # every block holding a visible key is visited once, by one partition, and no other is.
    rng = np.random.default_rng(0)
    for _ in range(300):
      t, s, bk = int(rng.integers(1, 6)), int(rng.integers(1, 60)), int(rng.choice([4, 8, 16]))
      window = None if rng.random() < 0.3 else int(rng.integers(1, 30))
      global_tokens = int(rng.integers(0, 8)) if window else 0
      spec = block_mask.FlashSpec(causal=True, window=window, global_tokens=global_tokens,
                                  q_length=t, kv_length=s, block_q=t, block_k=bk, scale=1.0)
      cache_length = int(rng.integers(0, s + 1))
      q_offset = int(rng.integers(-t, s + 2)) if rng.random() < 0.5 else cache_length - t
      num_splits = int(rng.integers(1, 5))
      visited = [block for p in range(num_splits)
                 for step in range(block_mask.split_steps_bound(spec, num_splits))
                 for block, valid in [block_mask.split_step_to_block(
                     spec, num_splits, p, step, q_offset, cache_length)] if valid]
      visible = {j // bk for i in range(q_offset, q_offset + t) for j in range(cache_length)
                 if j <= i and (window is None or i - j < window or j < global_tokens)}
      self.assertEqual(sorted(visited), sorted(visible),
                       (t, s, bk, window, global_tokens, cache_length, q_offset, num_splits))

  def test_inference_only(self):
    rng, (q, k, v) = random_cache(11, 1, 1, 2, 1, 8, jnp.float32)
    del rng
    with self.assertRaisesRegex(NotImplementedError, "inference-only"):
      jax.grad(lambda q: decode_attention(q, k, v, cache_length=9).sum())(q)

  def test_rejects_bad_inputs(self):
    rng, (q, k, v) = random_cache(0, 2, 1, 2, 1, 8, jnp.float32)
    del rng
    with self.assertRaisesRegex(ValueError, "cache_length must be a scalar"):
      decode_attention(q, k, v, cache_length=jnp.ones((3,), jnp.int32))
    with self.assertRaisesRegex(ValueError, "needs a window"):
      decode_attention(q, k, v, cache_length=4, global_tokens=2)
    with self.assertRaisesRegex(ValueError, "multiple of kv heads"):
      decode_attention(jnp.concatenate([q, q[:, :, :1]], axis=2), k.repeat(2, axis=2),
                       v.repeat(2, axis=2), cache_length=4)
    with self.assertRaisesRegex(ValueError, "TPU kernel needs"):
      decode_attention(q, k, v, cache_length=4, block_k=64, backend="tpu", interpret=False)
    with self.assertRaisesRegex(ValueError, "power-of-two"):
      decode_attention(q, k, v, cache_length=4, block_k=24, backend="gpu", interpret=False)


if __name__ == "__main__":
  absltest.main()
