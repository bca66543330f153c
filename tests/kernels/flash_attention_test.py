"""Flash attention kernels (interpret mode) against the dense reference, forward and gradients.

Both kernel variants (Mosaic-TPU-style and Triton-style) run in the Pallas interpreter on CPU.
The dense reference is itself checked against a loop over (batch, head, query, key) in numpy.
Lowering for real TPUs and GPUs is in `flash_attention_lowering_test.py`; the block-skipping
arithmetic in `block_mask_test.py`.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.flash_attention import flash_attention
from kernels_pallas.flash_attention import flash_attention_reference

# Tolerance per dtype, relative to the largest magnitude of the compared array. f32: the kernels
# and the reference differ only in summation order. bf16: both round probabilities and dS to
# bf16 before matmuls, the kernels relative to a running maximum, and gradients sum many rounded
# terms, so allow a few bf16 ulps (2^-8 ~ 4e-3).
TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def random_inputs(seed, batch, t, s, num_heads, num_kv_heads, head_dim, dtype):
  rng = np.random.default_rng(seed)
  shapes = ((batch, t, num_heads, head_dim), (batch, s, num_kv_heads, head_dim),
            (batch, s, num_kv_heads, head_dim))
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


def packed_segments(seed, batch, length, num_docs=3):
  """Sorted random document ids 1..num_docs with a padding tail of segment 0."""
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.integers(1, num_docs + 1, size=(batch, length)), axis=1)
  ids[:, length - length // 5:] = 0
  return jnp.asarray(ids, jnp.int32)


def alibi_slopes(num_heads):
  return 2.0 ** -(8.0 * jnp.arange(1, num_heads + 1, dtype=jnp.float32) / num_heads)


def bias_params(kind, num_heads):
  """Per-head parameters of a bias kind: (slopes,) or (r1, r2), distinct per head."""
  if kind == "alibi":
    return (alibi_slopes(num_heads),)
  if kind == "kerple_log":
    return jnp.linspace(0.5, 2.0, num_heads), jnp.linspace(0.2, 1.5, num_heads)
  return jnp.linspace(0.05, 0.5, num_heads), jnp.linspace(0.3, 1.8, num_heads)  # power


def make_positions(kind, seed, batch, length, segment_ids=None):
  """[B, L] int32 bias positions that differ from the indices.

  "shifted": 11 + index; "restarted": index within its segment (needs segment ids); "random":
  sorted random, non-contiguous (with repeats).
  """
  if kind == "shifted":
    return jnp.broadcast_to(11 + jnp.arange(length, dtype=jnp.int32), (batch, length))
  if kind == "restarted":
    ids = np.asarray(segment_ids)
    positions = np.zeros(ids.shape, np.int32)
    for i in range(1, length):  # a run of equal ids is one document
      positions[:, i] = np.where(ids[:, i] == ids[:, i - 1], positions[:, i - 1] + 1, 0)
    return jnp.asarray(positions)
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.sort(rng.integers(0, 3 * length, size=(batch, length)), axis=1),
                     jnp.int32)


@functools.partial(jax.jit, static_argnames=("fn",))
def outputs_and_grads(fn, q, k, v, params=()):
  """(out, lse) and d/d(q, k, v[, params]) of a loss that weights every output entry and lse.

  `fn(q, k, v)`, or `fn(q, k, v, params)` when bias parameters are given (their gradients are
  then appended to those of q, k, v).
  """

  def loss(q, k, v, *params):
    out, lse = fn(q, k, v, *params)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    w_lse = jnp.sin(jnp.arange(lse.size, dtype=jnp.float32)).reshape(lse.shape)
    # Rows that see no key have lse = -inf: leave them out of the loss.
    lse_term = jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0).sum()
    return (out.astype(jnp.float32) * w).sum() + lse_term, (out, lse)

  args = (q, k, v, params) if params else (q, k, v)
  grads, (out, lse) = jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True)(*args)
  if params:
    grads = grads[:3] + tuple(grads[3])
  return out, lse, grads


def assert_close(test, actual, expected, tol, name):
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  test.assertEqual(actual.shape, expected.shape, name)
  np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=name)
  finite = np.isfinite(expected)
  scale = max(1.0, float(np.abs(np.where(finite, expected, 0)).max(initial=0)))
  np.testing.assert_allclose(np.where(finite, actual, 0), np.where(finite, expected, 0),
                             atol=tol * scale, rtol=0, err_msg=name)


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
    _, main_lse = landmark_attention(q, k, v, block_len=5, return_lse=True)
    assert_close(self, lse, main_lse, 2e-6, "main softmax lse")


# (name, variant, dtype, shape (B, T, S, N, K, H), blocks (block_q, block_k), mask kwargs).
# T = S = 40 with blocks of 16 needs padding on both axes; N/K = 2 is GQA.
_PAD = (1, 40, 40, 4, 2, 8)
_CASES = (
    ("causal_gqa2", "gpu", jnp.float32, _PAD, (16, 16), dict()),
    ("causal_gqa2", "tpu", jnp.float32, _PAD, (16, 16), dict()),
    ("bidirectional_mha", "gpu", jnp.float32, (2, 40, 40, 2, 2, 8), (16, 16),
     dict(causal=False)),
    ("bidirectional_window", "tpu", jnp.float32, _PAD, (16, 16), dict(causal=False, window=7)),
    ("causal_window_unequal_blocks", "gpu", jnp.float32, (1, 24, 40, 2, 1, 8), (8, 16),
     dict(window=9)),
    ("global_window", "gpu", jnp.float32, _PAD, (16, 16), dict(window=6, global_tokens=3)),
    ("global_window", "tpu", jnp.float32, _PAD, (16, 16), dict(window=6, global_tokens=20)),
    ("segments", "gpu", jnp.float32, (2, 40, 40, 4, 2, 8), (16, 16), dict(segments=True)),
    ("segments_bidirectional", "tpu", jnp.float32, (2, 40, 40, 4, 2, 8), (16, 16),
     dict(segments=True, causal=False)),
    ("decode_offset_window", "gpu", jnp.float32, (2, 8, 40, 4, 2, 8), (8, 16),
     dict(q_offset=32, window=12)),
    ("decode_offset", "tpu", jnp.float32, (1, 5, 40, 4, 2, 8), (8, 16), dict(q_offset=35)),
    # ALiBi from indices (alibi_slopes); d(slopes) is checked with the other gradients.
    ("alibi_soft_cap", "gpu", jnp.float32, _PAD, (16, 16),
     dict(alibi=True, logit_soft_cap=1.0)),
    ("alibi_soft_cap_window", "tpu", jnp.float32, _PAD, (16, 16),
     dict(alibi=True, logit_soft_cap=2.0, window=10)),
    ("causal_gqa2_bf16", "gpu", jnp.bfloat16, _PAD, (16, 16), dict()),
    ("everything_bf16", "tpu", jnp.bfloat16, (2, 40, 40, 4, 2, 8), (16, 16),
     dict(window=8, global_tokens=2, segments=True, alibi=True, logit_soft_cap=3.0,
          q_offset=0)),
    ("default_blocks_gqa4", "gpu", jnp.float32, (1, 33, 70, 4, 1, 8), (None, None),
     dict(window=20)),
    # Landmark Attention's main softmax: periods shorter and longer than a tile, off the tile
    # grid, with a decode offset and packed documents.
    ("landmarks_5", "tpu", jnp.float32, _PAD, (16, 16), dict(landmark_block=5)),
    ("landmarks_24_gqa2", "gpu", jnp.float32, _PAD, (16, 16), dict(landmark_block=24)),
    ("landmarks_offset", "gpu", jnp.float32, (2, 8, 40, 4, 2, 8), (8, 16),
     dict(landmark_block=6, q_offset=30)),
    ("landmarks_segments_alibi_bf16", "tpu", jnp.bfloat16, (2, 40, 40, 4, 2, 8), (16, 16),
     dict(landmark_block=7, segments=True, alibi=True)),
    # Position-based biases: positions shifted, restarted per segment, or random sorted
    # (non-contiguous); gradients include the bias parameters.
    ("alibi_shifted", "gpu", jnp.float32, _PAD, (16, 16), dict(bias="alibi", positions="shifted")),
    ("alibi_random_window_cap", "tpu", jnp.float32, _PAD, (16, 16),
     dict(bias="alibi", positions="random", window=10, logit_soft_cap=2.0)),
    ("kerple_log_restarted", "tpu", jnp.float32, (2, 40, 40, 4, 2, 8), (16, 16),
     dict(bias="kerple_log", positions="restarted", segments=True)),
    ("kerple_log_random_gqa4_bidirectional", "gpu", jnp.float32, (1, 24, 40, 4, 1, 8), (8, 16),
     dict(bias="kerple_log", positions="random", causal=False)),
    ("kerple_power_random_decode_offset", "gpu", jnp.float32, (2, 8, 40, 4, 2, 8), (8, 16),
     dict(bias="kerple_power", positions="random", q_offset=32)),
    ("kerple_power_restarted", "tpu", jnp.float32, (2, 40, 40, 4, 2, 8), (16, 16),
     dict(bias="kerple_power", positions="restarted", segments=True, window=12)),
    ("kerple_log_shifted_bf16", "tpu", jnp.bfloat16, _PAD, (16, 16),
     dict(bias="kerple_log", positions="shifted")),
    ("kerple_power_random_bf16", "gpu", jnp.bfloat16, _PAD, (16, 16),
     dict(bias="kerple_power", positions="random")),
)


def _kwargs(case_kwargs, shape):
  """Kernel keywords of a case, and its bias parameters (a tuple; empty without a bias).

  `alibi=True` cases pass their slopes as `alibi_slopes` (the index-based shorthand), `bias=KIND`
  cases as `bias_params`; see `_with_params`.
  """
  b, t, s, n, _, _ = shape
  kwargs = dict(case_kwargs)
  if kwargs.pop("segments", False):
    kwargs["q_segment_ids"] = packed_segments(4, b, t)
    kwargs["kv_segment_ids"] = packed_segments(4, b, s) if t == s else packed_segments(5, b, s)
  params = ()
  if kwargs.pop("alibi", False):
    params = (alibi_slopes(n),)
  if "bias" in kwargs:
    kwargs["bias_kind"] = kwargs.pop("bias")
    params = bias_params(kwargs["bias_kind"], n)
  positions = kwargs.pop("positions", None)
  if positions is not None:
    kwargs["q_positions"] = make_positions(positions, 6, b, t, kwargs.get("q_segment_ids"))
    kwargs["kv_positions"] = make_positions(positions, 7, b, s, kwargs.get("kv_segment_ids"))
  return kwargs, params


def _with_params(kwargs, params):
  """kwargs plus the (traced) bias parameters under the keyword the case uses."""
  if not params:
    return kwargs
  if "bias_kind" in kwargs:
    return dict(kwargs, bias_params=params)
  return dict(kwargs, alibi_slopes=params[0])


class FlashAttentionTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name=f"{name}_{variant}", variant=variant, dtype=dtype, shape=shape,
           blocks=blocks, case_kwargs=case_kwargs)
      for name, variant, dtype, shape, blocks, case_kwargs in _CASES)
  def test_matches_reference(self, variant, dtype, shape, blocks, case_kwargs):
    q, k, v = random_inputs(0, *shape, dtype)
    kwargs, params = _kwargs(case_kwargs, shape)
    kernel = lambda q, k, v, *params: flash_attention(
        q, k, v, block_q=blocks[0], block_k=blocks[1], backend=variant, return_lse=True,
        **_with_params(kwargs, params[0] if params else ()))
    # bf16 kernels are compared with the f32 reference on the same (rounded) inputs.
    reference = lambda q, k, v, *params: flash_attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), return_lse=True,
        **_with_params(kwargs, params[0] if params else ()))
    out, lse, grads = outputs_and_grads(kernel, q, k, v, params)
    want_out, want_lse, want_grads = outputs_and_grads(reference, q, k, v, params)
    tol = TOLERANCES[dtype]
    self.assertEqual(out.dtype, dtype)
    self.assertEqual(lse.dtype, jnp.float32)
    assert_close(self, out, want_out, tol, "out")
    assert_close(self, lse, want_lse, tol, "lse")
    self.assertLen(grads, 3 + len(params))
    for name, grad, want in zip(("dq", "dk", "dv"), grads, want_grads):
      self.assertEqual(grad.dtype, dtype)
      assert_close(self, grad, want, tol, name)
    for p, (grad, want) in enumerate(zip(grads[3:], want_grads[3:])):
      self.assertEqual(grad.dtype, jnp.float32)
      self.assertGreater(float(jnp.abs(want).min()), 1e-3)  # a real signal on every head
      assert_close(self, grad, want, tol, f"d(bias parameter {p})")

  @parameterized.parameters("gpu", "tpu")
  def test_fully_masked_rows_give_zeros_and_finite_grads(self, variant):
    # Queries of segment 9 find no key of their segment.
    b, t, s, n, kh, h = 1, 20, 24, 2, 1, 8
    q, k, v = random_inputs(3, b, t, s, n, kh, h, jnp.float32)
    q_ids = jnp.asarray([[1] * 12 + [9] * 8])
    kv_ids = jnp.ones((1, s), jnp.int32)
    fn = functools.partial(flash_attention, q_segment_ids=q_ids, kv_segment_ids=kv_ids,
                           block_q=8, block_k=8, backend=variant, return_lse=True)
    out, lse, grads = outputs_and_grads(fn, q, k, v)
    np.testing.assert_array_equal(out[:, 12:], 0.0)
    self.assertTrue(np.isneginf(lse[:, :, 12:]).all())
    self.assertTrue(np.isfinite(lse[:, :, :12]).all())
    for grad in grads:
      self.assertTrue(np.isfinite(grad).all())
    np.testing.assert_array_equal(grads[0][:, 12:], 0.0)

  @parameterized.parameters("gpu", "tpu")
  def test_skipped_blocks_are_never_read(self, variant):
    # Decoding 16 queries at 48..63 with a window of 8 sees keys 41..63: key blocks 0 and 1
    # (of 16) are invisible to every query. Filled with NaN, they would poison the output or the
    # gradients (0 * NaN = NaN) if a kernel loaded and computed them.
    b, t, s, n, kh, h = 1, 16, 64, 2, 1, 8
    q, k, v = random_inputs(4, b, t, s, n, kh, h, jnp.float32)
    poisoned_k, poisoned_v = (x.at[:, :32].set(jnp.nan) for x in (k, v))
    fn = functools.partial(flash_attention, q_offset=48, window=8, block_q=8, block_k=16,
                           backend=variant, return_lse=True)
    out, lse, (dq, dk, dv) = outputs_and_grads(fn, q, poisoned_k, poisoned_v)
    want_out, want_lse, (want_dq, want_dk, want_dv) = outputs_and_grads(fn, q, k, v)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(lse, want_lse)
    np.testing.assert_array_equal(dq, want_dq)
    np.testing.assert_array_equal(dk[:, 32:], want_dk[:, 32:])
    np.testing.assert_array_equal(dv[:, 32:], want_dv[:, 32:])
    np.testing.assert_array_equal(dk[:, :32], 0.0)
    np.testing.assert_array_equal(dv[:, :32], 0.0)

  def test_traced_q_offset_does_not_recompile(self):
    b, t, s, n, kh, h = 1, 4, 32, 2, 1, 8
    q, k, v = random_inputs(5, b, t, s, n, kh, h, jnp.float32)
    traces = []

    @jax.jit
    def step(q_offset):
      traces.append(q_offset)
      return flash_attention(q, k, v, q_offset=q_offset, window=10, block_q=8, block_k=8,
                             backend="tpu")

    for offset in (3, 17, 28):
      want = flash_attention_reference(q, k, v, q_offset=offset, window=10)
      assert_close(self, step(jnp.int32(offset)), want, 2e-5, f"offset {offset}")
    self.assertLen(traces, 1)

  def test_rejects_bad_inputs(self):
    q, k, v = random_inputs(0, 1, 8, 8, 3, 2, 8, jnp.float32)
    with self.assertRaisesRegex(ValueError, "multiple of kv heads"):
      flash_attention(q, k, v)
    q, k, v = random_inputs(0, 1, 8, 8, 2, 1, 8, jnp.float32)
    with self.assertRaisesRegex(ValueError, "needs a window"):
      flash_attention(q, k, v, global_tokens=2)
    with self.assertRaisesRegex(ValueError, "TPU kernels need"):
      flash_attention(q, k, v, block_q=8, block_k=64, backend="tpu", interpret=False)
    with self.assertRaisesRegex(ValueError, "power-of-two"):
      flash_attention(q, k, v, block_q=24, block_k=32, backend="gpu", interpret=False)
    with self.assertRaisesRegex(ValueError, "variant"):
      flash_attention(q, k, v, backend="cpu")
    with self.assertRaisesRegex(ValueError, "takes bias_params = 2 arrays"):
      flash_attention(q, k, v, bias_kind="kerple_log", bias_params=jnp.ones(2))
    with self.assertRaisesRegex(ValueError, "bias_kind='rope'"):
      flash_attention(q, k, v, bias_kind="rope", bias_params=jnp.ones(2))
    with self.assertRaisesRegex(ValueError, "must be given together"):
      flash_attention(q, k, v, alibi_slopes=jnp.ones(2), q_positions=jnp.zeros((1, 8), int))


class FlashAttentionPropertyTest(absltest.TestCase):

  @hypothesis.settings(max_examples=10, deadline=None, derandomize=True,
                       suppress_health_check=list(hypothesis.HealthCheck))
  @hypothesis.given(data=st.data())
  def test_forward_matches_reference(self, data):
    draw = lambda name, strategy: data.draw(strategy, label=name)
    b = draw("B", st.integers(1, 2))
    t = draw("T", st.integers(1, 40))
    s = draw("S", st.integers(1, 40))
    kh = draw("K", st.integers(1, 2))
    n = kh * draw("G", st.sampled_from([1, 2, 3]))
    causal = draw("causal", st.booleans())
    window = draw("window", st.none() | st.integers(1, 24))
    global_tokens = draw("global", st.integers(0, 5)) if window is not None else 0
    q_offset = draw("q_offset", st.integers(0, 12))
    segments = draw("segments", st.booleans())
    block_q = draw("block_q", st.sampled_from([8, 16]))
    block_k = draw("block_k", st.sampled_from([8, 16]))
    variant = draw("variant", st.sampled_from(["gpu", "tpu"]))
    q, k, v = random_inputs(t * 41 + s, b, t, s, n, kh, 8, jnp.float32)
    kwargs = dict(causal=causal, window=window, global_tokens=global_tokens, q_offset=q_offset)
    if segments:
      kwargs.update(q_segment_ids=packed_segments(t, b, t, num_docs=2),
                    kv_segment_ids=packed_segments(s, b, s, num_docs=2))
    out, lse = flash_attention(q, k, v, block_q=block_q, block_k=block_k, backend=variant,
                               return_lse=True, **kwargs)
    want_out, want_lse = flash_attention_reference(q, k, v, return_lse=True, **kwargs)
    assert_close(self, out, want_out, 2e-5, "out")
    assert_close(self, lse, want_lse, 2e-5, "lse")


if __name__ == "__main__":
  absltest.main()
