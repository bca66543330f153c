"""The fused CPU flash attention kernel (C++ via XLA FFI) against the dense reference.

The reference is `longjax.ops.attention_reference`, itself checked against a float64 loop over
(batch, head, query, key) in tests/ops/attention_test.py. Every case compares the output, the
log-sum-exp and the gradients of q, k, v under a loss that weights every output entry and every
finite lse entry (so the lse cotangent path of the backward kernel is exercised too).
"""

import functools
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

import kernels_cpu
from kernels_pallas import softmax
from longjax.ops import AlibiBias
from longjax.ops import AttentionMask
from longjax.ops.attention import attention_reference
from tests import testing
from tests.kernels.attention_testing import packed_segments
from tests.kernels.attention_testing import random_inputs

# Relative to the largest magnitude of the compared array. f32: the kernel and the reference
# differ in summation order and in the kernel's polynomial exp (< 2e-7 relative); measured
# differences are ~1e-6. bf16 inputs: both compute in f32 after casting up, but the reference
# multiplies probabilities by V in bf16 and the outputs are rounded to bf16 (2^-8 ~ 4e-3).
TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


@functools.partial(jax.jit, static_argnames=("impl", "scale"))
def outputs_and_grads(impl, q, k, v, mask, slopes, positions, *, scale):
  """(out, lse) and d/d(q, k, v, slopes) of sum(out * w) + sum(finite lse * u), fixed w, u.

  `impl`: "kernel" (kernels_cpu) or "reference". The mask (its offset and segment ids traced),
  slopes and positions (None or (q_positions, kv_positions): ALiBi) are arguments, so every call
  of one shape and static mask shares one compiled program (the offsets of a decode case).
  """
  def attend(q, k, v, slopes):
    if impl == "reference":
      bias = None if positions is None else AlibiBias(slopes, *positions)
      return attention_reference(q, k, v, mask=mask, scale=scale, bias=bias)
    alibi = {} if positions is None else dict(alibi_slopes=slopes, q_positions=positions[0],
                                              kv_positions=positions[1])
    return kernels_cpu.flash_attention(
        q, k, v, scale=scale, causal=mask.causal, window=mask.window,
        global_tokens=mask.global_tokens, landmark_block=mask.landmark_block,
        q_offset=mask.q_offset, q_segment_ids=mask.q_segment_ids,
        kv_segment_ids=mask.kv_segment_ids, **alibi)

  def loss(q, k, v, slopes):
    out, lse = attend(q, k, v, slopes)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    u = jnp.sin(jnp.arange(lse.size, dtype=jnp.float32)).reshape(lse.shape)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return (out.astype(jnp.float32) * w).sum() + (finite * u).sum(), (out, lse)
  grads, (out, lse) = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, slopes)
  return out, lse, grads


def assert_close(actual, expected, dtype, what):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  np.testing.assert_array_equal(np.isfinite(actual), np.isfinite(expected), err_msg=what)
  finite = np.isfinite(expected)
  scale = max(1.0, float(np.abs(np.where(finite, expected, 0)).max()))
  np.testing.assert_allclose(np.where(finite, actual, 0), np.where(finite, expected, 0),
                             atol=TOLERANCES[jnp.dtype(dtype).type] * scale, rtol=0, err_msg=what)


def check_against_reference(q, k, v, mask, scale=None, alibi=None):
  """Asserts kernel == reference for out, lse and the gradients (and d(slopes) with ALiBi).

  `alibi`: None or (slopes [N], q_positions, kv_positions).
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  slopes = jnp.zeros((1,)) if alibi is None else alibi[0]
  positions = None if alibi is None else tuple(alibi[1:])
  got = outputs_and_grads("kernel", q, k, v, mask, slopes, positions, scale=scale)
  want = outputs_and_grads("reference", q, k, v, mask, slopes, positions, scale=scale)
  names = ("out", "lse", "dq", "dk", "dv") + (() if alibi is None else ("dslopes",))
  for name, a, b in zip(names, (got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
    assert_close(a, b, q.dtype, name)


class CpuFlashAttentionTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    reason = kernels_cpu.unavailable_reason()
    if reason is not None:  # the machine has no C++ compiler: say so rather than pass quietly
      raise absltest.SkipTest(f"fused CPU kernels unavailable: {reason}")

  # Every length with every head grouping and with and without causality, not every triple
  # (pairwise, 33 of 66): causality is the mask of a tile, the grouping which K/V head a query
  # head reads; each length crosses both with the tile edges.
  @parameterized.parameters(*(
      dict(lengths=lengths, causal=(i + j) % 2 == 0, heads=heads)
      for i, lengths in enumerate(((1, 1), (5, 5), (63, 63), (64, 64), (65, 65), (130, 130),
                                   (257, 257), (70, 200), (200, 70), (5, 1), (40, 1)))
      for j, heads in enumerate(((4, 4), (4, 2), (4, 1)))))
  def test_lengths_gqa_causal(self, lengths, causal, heads):
    t, s = lengths
    q, k, v = random_inputs(t * 7 + s, 2, t, s, *heads, 32, jnp.float32)
    check_against_reference(q, k, v, AttentionMask(causal=causal))

  @parameterized.parameters(16, 48, 64, 128)
  def test_head_dims(self, head_dim):
    q, k, v = random_inputs(head_dim, 1, 150, 150, 2, 1, head_dim, jnp.float32)
    check_against_reference(q, k, v, AttentionMask(causal=True))

  @parameterized.product(causal=(True, False), window=(1, 17, 128),
                         global_tokens=(0, 3, 130))
  def test_window_and_global_tokens(self, causal, window, global_tokens):
    q, k, v = random_inputs(window + global_tokens, 1, 300, 300, 4, 2, 32, jnp.float32)
    mask = AttentionMask(causal=causal, window=window, global_tokens=global_tokens)
    check_against_reference(q, k, v, mask)

  @parameterized.product(rows=(1, 2, 4, 5, 16, 70), offset=(0, 100, 441))
  def test_queries_at_an_offset(self, rows, offset):
    # Decode steps and chunked prefill: T queries at q_offset against a cache of S >= T + offset
    # entries, the tail unwritten (hidden by causality). T <= 4 takes the split-cache path.
    q, k, v = random_inputs(rows + offset, 2, rows, 512, 4, 2, 64, jnp.float32)
    for window in (None, 33):
      check_against_reference(q, k, v, AttentionMask(causal=True, window=window,
                                                     q_offset=jnp.int32(offset)))

  @parameterized.product(rows=(1, 3), mask_kind=("causal", "window", "landmark", "segments",
                                                  "alibi", "bidirectional_window"))
  def test_decode_splits_a_long_cache(self, rows, mask_kind):
    # T <= 4 rows split the visible cache into chunks of >= 512 keys (several here, 2000 + rows
    # visible of 2600) merged by log-sum-exp; every mask and ALiBi inside the chunks.
    s, offset = 2600, 2000
    q, k, v = random_inputs(rows * 11, 2, rows, s, 4, 1, 32, jnp.float32)
    ids = jnp.asarray(np.arange(s)[None] // 700, jnp.int32)
    masks = {
        "causal": AttentionMask(causal=True, q_offset=offset),
        "window": AttentionMask(causal=True, window=900, global_tokens=3, q_offset=offset),
        "landmark": AttentionMask(causal=True, landmark_block=64, q_offset=offset),
        "segments": AttentionMask(causal=True, q_offset=offset, kv_segment_ids=ids,
                                  q_segment_ids=ids[:, offset:offset + rows]),
        "alibi": AttentionMask(causal=True, q_offset=offset),
        # Global tokens past the window's reach from either side.
        "bidirectional_window": AttentionMask(causal=False, window=300, global_tokens=1500,
                                              q_offset=100),
    }
    alibi = None
    if mask_kind == "alibi":
      positions = jnp.arange(s, dtype=jnp.int32)[None]
      alibi = (jnp.asarray([0.5, 0.1, 0.02, 0.004]), positions[:, offset:offset + rows],
               positions)
    check_against_reference(q, k, v, masks[mask_kind], alibi=alibi)

  @parameterized.parameters(1, 3)
  def test_decode_merge_equals_the_python_merge(self, rows):
    # MergeDecodeChunks (C++) against kernels_pallas.softmax.merge_partials, the one merge:
    # the kernel's decode output equals the Python merge of dense partials over chunks of 512
    # keys (the kernel's kMinChunk; one batch row on any thread count gives 4 chunks here).
    # The window hides chunks 1 and 2 from every row: partials with lse = -inf.
    s, offset = 2600, 2000
    q, k, v = random_inputs(rows, 1, rows, s, 4, 2, 32, jnp.float32)
    mask = AttentionMask(causal=True, window=300, global_tokens=3, q_offset=offset)
    scale = 32 ** -0.5
    out, lse = jax.jit(functools.partial(
        kernels_cpu.flash_attention, scale=scale, causal=True, window=300, global_tokens=3,
        q_offset=offset))(q, k, v)
    logits = softmax.grouped_logits(q, k) * scale
    cols = jnp.arange(s)
    parts = [softmax.masked_softmax_attention(
        logits, mask.dense(rows, s) & (cols >= lo) & (cols < lo + 512), v)
             for lo in range(0, s, 512)]
    self.assertTrue(all(np.isneginf(np.asarray(part[1])).all() for part in parts[1:3]))
    want_out, want_lse = softmax.merge_attention(parts)
    assert_close(out, want_out, jnp.float32, "out")
    assert_close(lse, want_lse, jnp.float32, "lse")

  @parameterized.product(landmark_block=(2, 7, 64, 100), rows_offset=((300, 0), (3, 250)))
  def test_landmark_blocks(self, landmark_block, rows_offset):
    # Periods below, at and above the 64-key tile, off the grid; training and a decode step.
    rows, offset = rows_offset
    q, k, v = random_inputs(landmark_block, 1, rows, 300, 4, 2, 32, jnp.float32)
    check_against_reference(q, k, v, AttentionMask(causal=True, landmark_block=landmark_block,
                                                   q_offset=jnp.int32(offset)))

  @parameterized.parameters((2, 2), (2, 1))
  def test_segment_ids(self, batch, id_rows):
    q, k, v = random_inputs(batch, batch, 140, 140, 4, 2, 32, jnp.float32)
    ids = packed_segments(id_rows, id_rows, 140)
    for causal in (True, False):
      check_against_reference(q, k, v, AttentionMask(causal=causal, q_segment_ids=ids,
                                                     kv_segment_ids=ids))

  def test_rows_without_visible_keys(self):
    # Query segment 9 exists in no key: those rows give zeros, lse = -inf and zero gradients.
    q, k, v = random_inputs(3, 1, 96, 96, 2, 2, 16, jnp.float32)
    q_ids = jnp.where(jnp.arange(96) < 40, 1, 9)[None].astype(jnp.int32)
    kv_ids = jnp.ones((1, 96), jnp.int32)
    mask = AttentionMask(causal=True, q_segment_ids=q_ids, kv_segment_ids=kv_ids)
    check_against_reference(q, k, v, mask)
    out, lse = kernels_cpu.flash_attention(q, k, v, scale=0.25, q_segment_ids=q_ids,
                                           kv_segment_ids=kv_ids)
    self.assertTrue(np.all(np.asarray(out)[:, 40:] == 0))
    self.assertTrue(np.all(np.isneginf(np.asarray(lse)[:, :, 40:])))

  @parameterized.parameters((64, 64), (150, 300), (1, 300))
  def test_bfloat16(self, t, s):
    q, k, v = random_inputs(t, 1, t, s, 4, 2, 64, jnp.bfloat16)
    check_against_reference(q, k, v, AttentionMask(causal=True, q_offset=s - t))

  # Pairwise (6 of 12): every kind of positions with and without causality and with both
  # head groupings, and each grouping with and without causality.
  @parameterized.parameters(*(
      dict(positions=positions, causal=causal, heads=((4, 4), (4, 2))[(i + causal) % 2])
      for i, positions in enumerate(("indices", "shifted", "random"))
      for causal in (True, False)))
  def test_alibi(self, positions, causal, heads):
    # ALiBi from explicit positions, its slopes' gradient included (the reference adds
    # `AlibiBias` to dense logits).
    t, s = 150, 200
    q, k, v = random_inputs(t, 2, t, s, *heads, 32, jnp.float32)
    slopes = 2.0 ** -(8.0 * jnp.arange(1, heads[0] + 1, dtype=jnp.float32) / heads[0])
    rng = np.random.default_rng(len(positions))
    if positions == "indices":
      q_pos, kv_pos = jnp.arange(s - t, s)[None], jnp.arange(s)[None]
    elif positions == "shifted":
      q_pos, kv_pos = 11 + jnp.arange(s - t, s)[None], 11 + jnp.arange(s)[None]
    else:  # per batch row, sorted, with repeats
      q_pos = jnp.asarray(np.sort(rng.integers(0, 3 * s, size=(2, t)), axis=1))
      kv_pos = jnp.asarray(np.sort(rng.integers(0, 3 * s, size=(2, s)), axis=1))
    mask = AttentionMask(causal=causal, q_offset=s - t)
    check_against_reference(q, k, v, mask, alibi=(slopes, q_pos.astype(jnp.int32),
                                                  kv_pos.astype(jnp.int32)))

  def test_alibi_decode_window_bfloat16(self):
    q, k, v = random_inputs(5, 1, 3, 300, 4, 2, 64, jnp.bfloat16)
    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625])
    positions = jnp.arange(300, dtype=jnp.int32)[None]
    mask = AttentionMask(causal=True, window=100, global_tokens=4, q_offset=200)
    check_against_reference(q, k, v, mask, alibi=(slopes, positions[:, 200:203], positions))

  def test_scale(self):
    q, k, v = random_inputs(0, 1, 80, 80, 2, 2, 32, jnp.float32)
    check_against_reference(q, k, v, AttentionMask(causal=True), scale=0.7)

  @hypothesis.settings(max_examples=20, deadline=None)
  @hypothesis.given(t=st.integers(1, 200), extra=st.integers(0, 150), group=st.sampled_from([1, 3]),
                    head_dim=st.sampled_from([16, 32]), window=st.sampled_from([None, 1, 40]),
                    global_tokens=st.integers(0, 20))
  def test_hypothesis(self, t, extra, group, head_dim, window, global_tokens):
    s = t + extra
    q, k, v = random_inputs(t + s, 1, t, s, 2 * group, 2, head_dim, jnp.float32)
    mask = AttentionMask(causal=True, window=window,
                         global_tokens=global_tokens if window else 0, q_offset=extra)
    check_against_reference(q, k, v, mask)

  def test_offset_is_a_runtime_value(self):
    # One compilation serves every cache length: q_offset is an operand, not an attribute.
    q, k, v = random_inputs(1, 1, 1, 256, 2, 2, 32, jnp.float32)
    traces = []

    @jax.jit
    def step(q, k, v, offset):
      traces.append(None)
      return kernels_cpu.flash_attention(q, k, v, scale=0.2, q_offset=offset)[0]

    for offset in (0, 100, 255):
      mask = AttentionMask(causal=True, q_offset=offset)
      want = attention_reference(q, k, v, mask=mask, scale=0.2)[0]
      np.testing.assert_allclose(step(q, k, v, jnp.int32(offset)), want, atol=2e-5)
    self.assertLen(traces, 1)

  def test_vmap(self):
    q, k, v = random_inputs(2, 3, 70, 70, 2, 2, 16, jnp.float32)
    fn = lambda q, k, v: kernels_cpu.flash_attention(q[None], k[None], v[None], scale=0.25)[0][0]
    mask = AttentionMask(causal=True)
    want = attention_reference(q, k, v, mask=mask, scale=0.25)[0]
    np.testing.assert_allclose(jax.vmap(fn)(q, k, v), want, atol=2e-5)

  def test_refuses_what_it_cannot_serve(self):
    q, k, v = random_inputs(0, 1, 8, 8, 2, 2, 24, jnp.float32)
    with self.assertRaisesRegex(ValueError, "head dim 24 is not a multiple of 16"):
      kernels_cpu.flash_attention(q, k, v, scale=1.0)
    q, k, v = random_inputs(0, 1, 8, 8, 2, 2, 16, jnp.float32)
    with self.assertRaisesRegex(ValueError, "given together"):
      kernels_cpu.flash_attention(q, k, v, scale=1.0, q_segment_ids=jnp.zeros((1, 8), jnp.int32))
    with self.assertRaisesRegex(ValueError, "alibi_slopes needs q_positions"):
      kernels_cpu.flash_attention(q, k, v, scale=1.0, alibi_slopes=jnp.ones(2))
    positions = jnp.zeros((1, 8), jnp.int32)
    with self.assertRaisesRegex(ValueError, r"alibi_slopes must have shape \[2\]"):
      kernels_cpu.flash_attention(q, k, v, scale=1.0, alibi_slopes=jnp.ones(3),
                                  q_positions=positions, kv_positions=positions)


class BuildTest(absltest.TestCase):

  def test_without_a_compiler_says_why_and_auto_falls_back(self):
    # A fresh process with no compiler and an empty cache: the kernels are unavailable, with the
    # reason, and impl="auto" runs XLA's blockwise attention instead.
    code = (
        "import jax, jax.numpy as jnp, kernels_cpu\n"
        "from longjax import ops\n"
        "print(kernels_cpu.unavailable_reason())\n"
        "print(ops.attention.cpu_unsupported(None, 64))\n"
        "x = jnp.ones((1, 300, 2, 64))\n"
        "print(float(ops.dot_product_attention(x, x, x, mask=ops.AttentionMask()).sum()))\n")
    with tempfile.TemporaryDirectory() as cache:
      env = dict(os.environ, CXX="/nonexistent/g++", LONGJAX_CACHE=cache, JAX_PLATFORMS="cpu")
      done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, cwd=testing.REPO_ROOT, timeout=300)
    self.assertEqual(done.returncode, 0, done.stderr[-2000:])
    lines = done.stdout.splitlines()
    self.assertIn("no C++ compiler (/nonexistent/g++)", lines[0])
    self.assertEqual(lines[0], lines[1])
    self.assertAlmostEqual(float(lines[2]), 300 * 2 * 64, places=2)
    # The fallback says so, once.
    self.assertEqual(done.stderr.count("the fused CPU attention kernel cannot serve this call "
                                       "(no C++ compiler (/nonexistent/g++)"), 1,
                     done.stderr[-2000:])

  def test_cache_entries_are_verified_rebuilt_and_readable_without_the_lock(self):
    from kernels_cpu import build  # pylint: disable=g-import-not-at-top
    builds = []

    def fake_build(path):
      builds.append(path)
      path.write_bytes(b"library %d" % len(builds))

    with tempfile.TemporaryDirectory() as root:
      cache = build.pathlib.Path(root) / "cpu_kernels"
      target = build.cached_library(cache, "lib.so", fake_build)
      self.assertEqual((target.read_bytes(), len(builds)), (b"library 1", 1))
      build.cached_library(cache, "lib.so", fake_build)
      self.assertLen(builds, 1)  # verified: used as it is
      target.write_bytes(b"libr")  # truncated, as by a full disk: rebuilt, never loaded
      self.assertEqual(build.cached_library(cache, "lib.so", fake_build).read_bytes(),
                       b"library 2")
      (cache / "lib.so.sha256").unlink()  # no checksum (an older build): rebuilt
      build.cached_library(cache, "lib.so", fake_build)
      self.assertLen(builds, 3)
      # A cache that cannot be written (its lock cannot be opened for writing, even by root):
      # a valid library is still used; a damaged one is an error, which says why.
      (cache / ".lock").unlink()
      (cache / ".lock").mkdir()
      self.assertEqual(build.cached_library(cache, "lib.so", fake_build), target)
      target.write_bytes(b"")
      with self.assertRaises(IsADirectoryError):
        build.cached_library(cache, "lib.so", fake_build)
      self.assertLen(builds, 3)

  def test_a_truncated_cached_library_is_rebuilt_not_loaded(self):
    # Before checksums, a truncated .so in the cache was loaded and crashed every run (SIGBUS).
    code = ("import kernels_cpu, jax.numpy as jnp\n"
            "print(kernels_cpu.unavailable_reason())\n"
            "x = jnp.ones((1, 128, 1, 64))\n"
            "print(float(kernels_cpu.flash_attention(x, x, x, scale=0.125)[0].sum()))\n")
    with tempfile.TemporaryDirectory() as cache:
      # -O0 (CXXFLAGS follow the build's -O3): the build takes 4 s instead of 9, and this test
      # is about which binary gets loaded, not its speed.
      env = dict(os.environ, LONGJAX_CACHE=cache, JAX_PLATFORMS="cpu", CXXFLAGS="-O0")
      runs = []
      for _ in range(2):
        runs.append(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                   text=True, env=env, cwd=testing.REPO_ROOT, timeout=300))
        library = [p for p in os.listdir(os.path.join(cache, "cpu_kernels"))
                   if p.endswith(".so")]
        self.assertLen(library, 1)
        path = os.path.join(cache, "cpu_kernels", library[0])
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
    for done in runs:
      self.assertEqual(done.returncode, 0, done.stderr[-2000:])
      self.assertEqual(done.stdout.splitlines(), ["None", str(128 * 64.0)])

  def test_cache_key_changes_with_the_machine(self):
    # A binary built with -march=native for one CPU must not be loaded on another.
    from kernels_cpu import build  # pylint: disable=g-import-not-at-top
    compiler = build._compiler()  # pylint: disable=protected-access
    if compiler is None:
      self.skipTest("no C++ compiler on PATH")
    key = build._build_key(compiler)  # pylint: disable=protected-access
    self.assertEqual(key, build._build_key(compiler))  # pylint: disable=protected-access
    with mock.patch.object(build, "_cpu_flags", return_value="flags : fpu sse2"):
      self.assertNotEqual(key, build._build_key(compiler))  # pylint: disable=protected-access

  def test_avx2_build_equals_the_reference(self):
    # The kernel's vectors are 16 lanes where the CPU has AVX-512 and 8 lanes elsewhere (AVX2:
    # many AMD and laptop CPUs), with code of their own (ReduceSums' shuffles, tile sizes). On an
    # AVX-512 machine the 8-lane build is otherwise never run: build it here (CXXFLAGS, its own
    # cache) and run a cross-section of this file's numerical cases against it in a child.
    from kernels_cpu import build  # pylint: disable=g-import-not-at-top
    if "avx512f" not in build._cpu_flags():  # pylint: disable=protected-access
      self.skipTest("this CPU has no AVX-512: the default build already is the 8-lane code")
    # ~30 cases: a length off the tile edges (T=150, head dims 16 to 128), GQA, the split decode
    # path, ALiBi, segments, bfloat16 and empty rows; with them, the selective-scan kernel's
    # checkpointed backward (lane sums of 8 and of 3). The hypothesis search (14 s) stays with
    # the default build: it searches the tiling, which both builds share; what differs is the
    # vector width, which these cases exercise.
    cases = ("test_head_dims or test_decode_splits_a_long_cache or "
             "test_alibi or test_bfloat16 or test_segment_ids or test_scale or "
             "test_rows_without_visible_keys or test_cpu_kernel_over_several_checkpoint_chunks")
    scan_tests = os.path.join(testing.REPO_ROOT, "tests", "ops", "selective_scan_test.py")
    with tempfile.TemporaryDirectory() as cache:
      env = dict(os.environ, CXXFLAGS="-mno-avx512f", LONGJAX_CACHE=cache, JAX_PLATFORMS="cpu")
      done = subprocess.run(
          [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", cases, __file__,
           scan_tests],
          capture_output=True, text=True, env=env, cwd=testing.REPO_ROOT, timeout=900)
      built = os.listdir(os.path.join(cache, "cpu_kernels"))
    self.assertEqual(done.returncode, 0, done.stdout[-3000:] + done.stderr[-2000:])
    self.assertRegex(done.stdout, r"\d+ passed")
    # The child built its own binary (CXXFLAGS is part of the build key), not this process's.
    default = build._build_key(build._compiler())  # pylint: disable=protected-access
    binaries = [name for name in built if name.endswith(".so")]
    self.assertLen(binaries, 1)
    self.assertNotEqual(binaries[0], f"longjax_cpu_{default}.so")


if __name__ == "__main__":
  absltest.main()
