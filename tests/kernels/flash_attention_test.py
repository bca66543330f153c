"""Flash attention kernels (interpret mode) against the dense reference, forward and gradients.

Both kernel variants (Mosaic-TPU-style and Triton-style) run in the Pallas interpreter on CPU.
The dense reference is itself checked against a float64 loop in
`flash_attention_reference_test.py`, lowering for real TPUs and GPUs in
`flash_attention_lowering_test.py`, the block-skipping arithmetic in `block_mask_test.py`.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.flash.kernel import flash_attention
from kernels_pallas.flash.kernel import flash_attention_reference
from tests.kernels.attention_testing import TOLERANCES
from tests.kernels.attention_testing import alibi_slopes
from tests.kernels.attention_testing import assert_close
from tests.kernels.attention_testing import bias_params
from tests.kernels.attention_testing import make_positions
from tests.kernels.attention_testing import outputs_and_grads
from tests.kernels.attention_testing import packed_segments
from tests.kernels.attention_testing import random_inputs

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
    # One jitted program per example (kernel and reference), not one per op.
    out, lse = jax.jit(lambda q, k, v: flash_attention(
        q, k, v, block_q=block_q, block_k=block_k, backend=variant, return_lse=True,
        **kwargs))(q, k, v)
    want_out, want_lse = jax.jit(lambda q, k, v: flash_attention_reference(
        q, k, v, return_lse=True, **kwargs))(q, k, v)
    assert_close(self, out, want_out, 2e-5, "out")
    assert_close(self, lse, want_lse, 2e-5, "lse")


if __name__ == "__main__":
  absltest.main()
