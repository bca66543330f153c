"""Flash attention's T5 and FIRE biases (interpret mode): reference == longjax, kernel == reference.

The kernel's dense reference is checked against `longjax.ops.attention.attention_reference` with
`T5Bias` / `FireBias` (the library's definitions; the T5 bucket table bit for bit), then both
kernel variants against the reference: forward, lse and the gradients of q, k, v and of every
bias parameter (T5's table, FIRE's c, threshold and MLP), f32 and bf16, with padded lengths, GQA,
windows, segment ids, query offsets and positions shifted / restarted per segment / random.
ALiBi and KERPLE are tested the same way in `flash_attention_test.py`.
"""

import sys

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.flash.kernel import flash_attention
from kernels_pallas.flash.kernel import flash_attention_reference
from tests.kernels.attention_testing import TOLERANCES
from tests.kernels.attention_testing import assert_close
from tests.kernels.attention_testing import make_positions
from tests.kernels.attention_testing import outputs_and_grads
from tests.kernels.attention_testing import packed_segments
from tests.kernels.attention_testing import random_inputs

# The module (kernels_pallas re-exports the function under the module's name).
flash_module = sys.modules[flash_attention.__module__]


# FIRE's c and L: their gradients sum every (row, key) pair of every head, and the exact terms
# largely cancel. The kernels' d(logits) = p (dP - D) with FlashAttention-2's D = rowsum(dO * O)
# carries an f32 rounding of D that is the same along a row, so it does not cancel with them:
# measured d(c) 6e-5 relative off the float64 value (the f32 reference 2e-6); with a loss of
# lse alone (D exact) the kernel is as close as the reference.
SHARED_TOLERANCES = {jnp.float32: 1e-4, jnp.bfloat16: TOLERANCES[jnp.bfloat16]}


def t5_table(seed, num_buckets, num_heads):
  """A [num_buckets, N] table with distinct entries (a zero table would hide lookup errors)."""
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(num_buckets, num_heads)), jnp.float32),)


def fire_params(seed, hidden, num_heads, threshold=12.0):
  """(c, threshold, w1, b1, w2, b2) with kinks of the MLP inside [0, 1], where x lies.

  The default threshold 12 is an integer position in the tests, so some rows hit the tie of
  max(L, i), whose derivative jnp.maximum splits in half.
  """
  rng = np.random.default_rng(seed)
  w1 = np.abs(rng.normal(size=hidden)) + 0.5
  knots = rng.uniform(0.0, 1.0, size=hidden)
  return (jnp.float32(0.3), jnp.float32(threshold), jnp.asarray(w1, jnp.float32),
          jnp.asarray(-w1 * knots, jnp.float32),
          jnp.asarray(rng.normal(size=(hidden, num_heads)), jnp.float32),
          jnp.asarray(rng.normal(size=num_heads), jnp.float32))


class T5BucketsTest(parameterized.TestCase):

  @parameterized.parameters((32, 128, False), (32, 128, True), (8, 20, False), (16, 40, True),
                            (2, 3, False), (6, 5, True))
  def test_bucket_table_matches_t5s_formula(self, num_buckets, max_distance, bidirectional):
    # The one table (kernels_pallas.t5_buckets, also longjax's) against a per-distance
    # transcription of the paper's bucketing, beyond +-max_distance too.
    from tests.posenc import reference_biases  # pylint: disable=g-import-not-at-top
    table = flash_module.t5_bucket_table(num_buckets, max_distance, bidirectional)
    for d in range(-max_distance - 3, max_distance + 4):
      self.assertEqual(table[np.clip(d, -max_distance, max_distance) + max_distance],
                       reference_biases.t5_bucket(d, num_buckets, max_distance, bidirectional),
                       d)

  def test_runs_cover_the_table(self):
    # The kernel's selects over bucket runs give every clipped distance its table bucket.
    for args in ((32, 128, False), (32, 128, True), (6, 5, True)):
      table = flash_module.t5_bucket_table(*args)
      runs = flash_module._t5_runs(*args)  # pylint: disable=protected-access
      max_distance = args[1]
      for d in range(-max_distance - 3, max_distance + 4):
        bucket = [b for start, b in runs if start <= d or start == runs[0][0]][-1]
        self.assertEqual(bucket, table[np.clip(d, -max_distance, max_distance) + max_distance])

  def test_rejects_bad_bucket_configs(self):
    q, k, v = random_inputs(0, 1, 8, 8, 2, 1, 8, jnp.float32)
    with self.assertRaisesRegex(ValueError, "max_distance > 8"):
      flash_attention(q, k, v, bias_kind="t5", bias_params=jnp.ones((16, 2)), t5_max_distance=8)
    with self.assertRaisesRegex(ValueError, "even"):
      flash_attention(q, k, v, bias_kind="t5", bias_params=jnp.ones((5, 2)),
                      t5_bidirectional=True)
    with self.assertRaisesRegex(ValueError, "parameter shapes"):
      flash_attention(q, k, v, bias_kind="t5", bias_params=jnp.ones((16, 3)))
    with self.assertRaisesRegex(ValueError, "parameter shapes"):
      flash_attention(q, k, v, bias_kind="fire", bias_params=fire_params(0, 4, 3))
    with self.assertRaisesRegex(ValueError, "takes bias_params"):
      flash_attention(q, k, v, bias_kind="fire", bias_params=fire_params(0, 4, 2)[:5])


class ReferenceTest(parameterized.TestCase):

  @parameterized.parameters("t5", "t5_bidirectional", "fire")
  def test_reference_matches_longjax_biases(self, kind):
    # Positions restarted per packed document, plus a window and a query offset: the kernel's
    # reference is `attention_reference` with the library's bias (values, lse and gradients of
    # q and of every bias parameter).
    from longjax.ops import attention  # pylint: disable=g-import-not-at-top
    from longjax.ops import biases  # pylint: disable=g-import-not-at-top
    from longjax.ops import masks  # pylint: disable=g-import-not-at-top
    from longjax.posenc import relative_bias  # pylint: disable=g-import-not-at-top
    b, t, n, kh, h = 2, 30, 4, 2, 8
    q, k, v = random_inputs(7, b, t, t, n, kh, h, jnp.float32)
    ids = packed_segments(8, b, t)
    pos = make_positions("restarted", 0, b, t, ids) + 3
    causal = kind != "t5_bidirectional"
    mask = masks.AttentionMask(causal=causal, window=20, q_offset=2, q_segment_ids=ids,
                               kv_segment_ids=ids)
    if kind == "fire":
      params = fire_params(1, 6, n, threshold=7.0)
      options = {}
      make_bias = lambda p: biases.FireBias(params=relative_bias.FireParams(*p),
                                            q_positions=pos, kv_positions=pos)
    else:
      params = t5_table(1, 8, n)
      options = dict(t5_max_distance=10, t5_bidirectional=not causal)
      make_bias = lambda p: biases.T5Bias(table=p[0], q_positions=pos, kv_positions=pos,
                                          max_distance=10, bidirectional=not causal)
    # The bias itself, bit for bit (the same jnp operations as `longjax.posenc.relative_bias`).
    rel = pos[:, :, None] - pos[:, None, :]
    dense = flash_module._reference_bias(  # pylint: disable=protected-access
        "fire" if kind == "fire" else "t5", params, rel, pos, 10, not causal)
    np.testing.assert_array_equal(dense, make_bias(params).block(0, t, 0, t))

    def loss(q, params, use_kernel_reference):
      if use_kernel_reference:
        out, lse = flash_attention_reference(
            q, k, v, causal=causal, window=20, q_offset=2, q_segment_ids=ids,
            kv_segment_ids=ids, bias_kind="fire" if kind == "fire" else "t5",
            bias_params=params, q_positions=pos, kv_positions=pos, return_lse=True, **options)
      else:
        out, lse = attention.attention_reference(q, k, v, mask=mask, bias=make_bias(params),
                                                 scale=h ** -0.5)
      return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    # Jitted: one compiled program per side instead of one per op.
    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    want, want_grads = grad_fn(q, params, False)
    got, grads = grad_fn(q, params, True)
    np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=kind)
    want_leaves, leaves = jax.tree.leaves(want_grads), jax.tree.leaves(grads)
    self.assertLen(leaves, len(want_leaves))
    for i, (got_grad, want_grad) in enumerate(zip(leaves, want_leaves)):
      self.assertGreater(float(jnp.abs(want_grad).max()), 1e-3, f"{kind} gradient {i}")
      assert_close(self, got_grad, want_grad, 1e-6, f"{kind} gradient {i}")


# (name, variant, dtype, shape (B, T, S, N, K, H), blocks, bias kwargs). T = S = 40 with blocks
# of 16 pads both axes; N/K = 2 or 4 is GQA. "table": (num_buckets, max_distance); "fire":
# (F, threshold L), L an integer position so that max(L, i) ties on some row.
_PAD = (2, 40, 40, 4, 2, 8)
_CASES = (
    ("t5_restarted_segments_window", "tpu", jnp.float32, _PAD, (16, 16),
     dict(table=(8, 20), positions="restarted", segments=True, window=12)),
    ("t5_restarted_segments_window", "gpu", jnp.float32, _PAD, (16, 16),
     dict(table=(8, 20), positions="restarted", segments=True, window=12)),
    ("t5_bidirectional_random_gqa4", "gpu", jnp.float32, (1, 24, 40, 4, 1, 8), (8, 16),
     dict(table=(16, 40), bidirectional=True, positions="random", causal=False)),
    ("t5_bidirectional_window_segments", "tpu", jnp.float32, _PAD, (16, 16),
     dict(table=(6, 5), bidirectional=True, causal=False, window=9, segments=True)),
    ("t5_indices_decode_offset", "gpu", jnp.float32, (2, 8, 40, 4, 2, 8), (8, 16),
     dict(table=(32, 128), q_offset=32, window=20)),
    ("t5_shifted_offset_cap", "tpu", jnp.float32, (1, 24, 40, 4, 2, 8), (8, 16),
     dict(table=(8, 16), positions="shifted", q_offset=9, logit_soft_cap=2.0)),
    ("fire_shifted_segments_window", "gpu", jnp.float32, _PAD, (16, 16),
     dict(fire=(6, 12.0), positions="shifted", segments=True, window=12)),
    ("fire_shifted_segments_window", "tpu", jnp.float32, _PAD, (16, 16),
     dict(fire=(6, 12.0), positions="shifted", segments=True, window=12)),
    ("fire_random_bidirectional_gqa4", "tpu", jnp.float32, (1, 24, 40, 4, 1, 8), (8, 16),
     dict(fire=(5, 12.0), positions="random", causal=False)),
    ("fire_indices_decode_offset", "gpu", jnp.float32, (2, 8, 40, 4, 2, 8), (8, 16),
     dict(fire=(4, 36.0), q_offset=32, window=12)),  # rows at 32..39: L ties with row 4
    ("fire_restarted_offset", "tpu", jnp.float32, _PAD, (16, 16),
     dict(fire=(3, 12.0), positions="restarted", segments=True, q_offset=4)),
    ("t5_everything_bf16", "tpu", jnp.bfloat16, _PAD, (16, 16),
     dict(table=(8, 20), positions="restarted", segments=True, window=12, q_offset=3)),
    ("t5_bidirectional_bf16", "gpu", jnp.bfloat16, (1, 24, 40, 4, 1, 8), (8, 16),
     dict(table=(16, 40), bidirectional=True, positions="random", causal=False)),
    ("fire_everything_bf16", "gpu", jnp.bfloat16, _PAD, (16, 16),
     dict(fire=(6, 12.0), positions="shifted", segments=True, window=12, q_offset=3)),
    ("fire_random_bf16", "tpu", jnp.bfloat16, (1, 24, 40, 4, 1, 8), (8, 16),
     dict(fire=(5, 12.0), positions="random", causal=False)),
)


def _kwargs(case_kwargs, shape):
  """Kernel keywords of a case and its bias parameters."""
  b, t, s, n, _, _ = shape
  kwargs = dict(case_kwargs)
  if kwargs.pop("segments", False):
    kwargs["q_segment_ids"] = packed_segments(4, b, t)
    kwargs["kv_segment_ids"] = packed_segments(4, b, s) if t == s else packed_segments(5, b, s)
  if "table" in kwargs:
    num_buckets, kwargs["t5_max_distance"] = kwargs.pop("table")
    kwargs["t5_bidirectional"] = kwargs.pop("bidirectional", False)
    kwargs["bias_kind"], params = "t5", t5_table(2, num_buckets, n)
  else:
    hidden, threshold = kwargs.pop("fire")
    kwargs["bias_kind"], params = "fire", fire_params(3, hidden, n, threshold)
  positions = kwargs.pop("positions", None)
  if positions is not None:
    kwargs["q_positions"] = make_positions(positions, 6, b, t, kwargs.get("q_segment_ids"))
    kwargs["kv_positions"] = make_positions(positions, 7, b, s, kwargs.get("kv_segment_ids"))
  return kwargs, params


class FlashAttentionBiasTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name=f"{name}_{variant}", variant=variant, dtype=dtype, shape=shape,
           blocks=blocks, case_kwargs=case_kwargs)
      for name, variant, dtype, shape, blocks, case_kwargs in _CASES)
  def test_matches_reference(self, variant, dtype, shape, blocks, case_kwargs):
    q, k, v = random_inputs(0, *shape, dtype)
    kwargs, params = _kwargs(case_kwargs, shape)
    kernel = lambda q, k, v, params: flash_attention(
        q, k, v, block_q=blocks[0], block_k=blocks[1], backend=variant, return_lse=True,
        bias_params=params, **kwargs)
    # bf16 kernels are compared with the f32 reference on the same (rounded) inputs.
    reference = lambda q, k, v, params: flash_attention_reference(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), return_lse=True,
        bias_params=params, **kwargs)
    out, lse, grads = outputs_and_grads(kernel, q, k, v, params)
    want_out, want_lse, want_grads = outputs_and_grads(reference, q, k, v, params)
    tol = TOLERANCES[dtype]
    self.assertEqual(out.dtype, dtype)
    assert_close(self, out, want_out, tol, "out")
    assert_close(self, lse, want_lse, tol, "lse")
    self.assertLen(grads, 3 + len(params))
    for name, grad, want in zip(("dq", "dk", "dv"), grads, want_grads):
      self.assertEqual(grad.dtype, dtype)
      assert_close(self, grad, want, tol, name)
    names = ("d(table)",) if len(params) == 1 else tuple(
        f"d({x})" for x in ("c", "threshold", "w1", "b1", "w2", "b2"))
    for name, grad, want in zip(names, grads[3:], want_grads[3:]):
      self.assertEqual(grad.dtype, jnp.float32)
      self.assertGreater(float(jnp.abs(want).max()), 1e-3, name)  # a real signal
      shared = name in ("d(c)", "d(threshold)")
      assert_close(self, grad, want, SHARED_TOLERANCES[dtype] if shared else tol, name)
      # Buckets that no visible pair reaches (e.g. keys after the query) get exactly 0.
      np.testing.assert_array_equal(np.asarray(grad) == 0, np.asarray(want) == 0, name)

  def test_t5_table_gradient_counts_pairs_per_bucket(self):
    # With zero q, k (uniform attention within the window) and a loss of sum(lse) at a zero
    # table, d(table[b, n]) = sum over rows of (visible pairs in bucket b) / (visible pairs):
    # an independent count over the index distances.
    b, t, n, h, window = 1, 21, 2, 8, 9
    q = k = v = jnp.zeros((b, t, n, h), jnp.float32)
    table = jnp.zeros((8, n), jnp.float32)
    buckets = flash_module.t5_bucket_table(8, 12, False)
    want = np.zeros(8)
    for i in range(t):
      seen = [i - j for j in range(t) if 0 <= i - j < window]
      for d in seen:
        want[buckets[d + 12]] += 1.0 / len(seen)
    for variant in ("gpu", "tpu"):
      grad = jax.jit(jax.grad(lambda table, variant=variant: flash_attention(
          q, k, v, window=window, bias_kind="t5", bias_params=table, t5_max_distance=12,
          block_q=8, block_k=8, backend=variant, return_lse=True)[1].sum()))(table)
      np.testing.assert_allclose(grad, np.repeat(want[:, None], n, 1), atol=1e-5, rtol=0)


if __name__ == "__main__":
  absltest.main()
