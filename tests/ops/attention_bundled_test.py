"""jax's bundled kernels behind `impl="splash"` (TPU) and `impl="cudnn"` (GPU), and "auto"'s rule.

Neither runs natively here, so: splash runs in the Pallas interpreter (its own `interpret=True`)
and is compared with the dense reference forward and backward, and lowered for TPU; the cuDNN
wrapper's mapping of longjax's mask onto `jax.nn.dot_product_attention` is checked with jax.nn's
XLA implementation (same arguments, `implementation="xla"`), and its TPU/GPU dispatch with the
backend patched. Lowering the cuDNN call needs cuDNN installed (see `test_cudnn_lowers`).
"""

import re
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import common
from longjax.ops import AlibiBias
from longjax.ops import AttentionMask
from longjax.ops import attention_bundled
from longjax.ops import dot_product_attention
from longjax.ops import resolve_call
from longjax.ops.attention import attention_reference
from tests.kernels import lowering
from tests.ops.attention_test import packed_segments
from tests.ops.attention_test import random_inputs

# (atol, rtol) against the dense reference on values of order 1. f32: summation order only.
# bf16: the kernels round probabilities to bf16 before the PV / dV matmuls, and splash also
# rounds scale * q to bf16 (it has no scale argument).
TOLERANCES = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (4e-2, 4e-2)}
MASKS = {
    "causal": dict(causal=True),
    "full": dict(causal=False),
    "causal_window": dict(causal=True, window=100),
    "symmetric_window": dict(causal=False, window=100),
}


def _grads(attn, q, k, v, weight):
  """Output and (dq, dk, dv) of a loss that weights every output entry.

  Jitted: one compiled program (the interpreted kernels and the reference's ops together)
  instead of one per op; the values are those of the same ops.
  """

  @jax.jit
  def output_and_grads(q, k, v, weight):
    loss = lambda q, k, v: (attn(q, k, v).astype(jnp.float32) * weight).sum()  # noqa: E731
    return attn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  return output_and_grads(q, k, v, weight)


def _assert_close(test, got, want, dtype):
  atol, rtol = TOLERANCES[dtype]
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    scale = float(jnp.abs(w.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               atol=atol * max(scale, 1.0), rtol=rtol)


class SplashTest(parameterized.TestCase):

  # Every mask in both dtypes, the head groupings (MHA, GQA, MQA) spread over them: each
  # interpreted case costs ~3 s, and the full 24-case product added nothing these miss.
  @parameterized.parameters(
      *((mask, heads, jnp.float32)
        for mask, heads in zip(MASKS, ((4, 4), (4, 2), (4, 1), (4, 4)))),
      *((mask, heads, jnp.bfloat16)
        for mask, heads in zip(MASKS, ((4, 1), (4, 4), (4, 2), (4, 2)))))
  def test_matches_reference(self, mask, heads, dtype):
    n, kh = heads
    q, k, v = random_inputs(0, 2, 256, 256, n, kh, 64, dtype)
    weight = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
    spec = AttentionMask(**MASKS[mask])
    splash = lambda q, k, v: dot_product_attention(q, k, v, mask=spec, impl="splash")  # noqa
    reference = lambda q, k, v: attention_reference(q, k, v, mask=spec, scale=0.125)[0]  # noqa
    _assert_close(self, _grads(splash, q, k, v, weight), _grads(reference, q, k, v, weight),
                  dtype)

  def test_packed_documents(self):
    q, k, v = random_inputs(2, 2, 384, 384, 2, 1, 64, jnp.float32)
    ids = packed_segments(np.random.default_rng(3), 2, 384)
    spec = AttentionMask(causal=True, window=200, q_segment_ids=ids, kv_segment_ids=ids)
    weight = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)
    splash = lambda q, k, v: dot_product_attention(q, k, v, mask=spec, impl="splash")  # noqa
    reference = lambda q, k, v: attention_reference(q, k, v, mask=spec, scale=0.125)[0]  # noqa
    _assert_close(self, _grads(splash, q, k, v, weight), _grads(reference, q, k, v, weight),
                  jnp.float32)

  def test_refusals_name_the_reason(self):
    q, k, v = random_inputs(5, 1, 256, 256, 2, 2, 64, jnp.float32)
    ids = jnp.ones((1, 256), jnp.int32)
    positions = jnp.arange(256)[None]
    cases = {
        "no logit bias .got AlibiBias.": dict(bias=AlibiBias(jnp.ones(2), positions, positions)),
        "no differentiable log-sum-exp": dict(return_lse=True),
        "self-attention only .T == S and a static q_offset of 0; got T=256, S=256, q_offset=3":
            dict(mask=AttentionMask(causal=True, q_offset=3)),
        "global tokens / sinks .global_tokens=4.": dict(
            mask=AttentionMask(causal=True, window=64, global_tokens=4)),
        "one segment-id array for queries and keys": dict(
            mask=AttentionMask(causal=True, q_segment_ids=ids, kv_segment_ids=ids + 0)),
    }
    for reason, kwargs in cases.items():
      kwargs = {"mask": AttentionMask(causal=True), **kwargs}
      with self.assertRaisesRegex(ValueError, "impl='splash' cannot serve this call: .*" + reason):
        dot_product_attention(q, k, v, impl="splash", **kwargs)
    with self.assertRaisesRegex(ValueError, "T=200 is not a multiple of its block of 128"):
      dot_product_attention(q[:, :200], k[:, :200], v[:, :200], mask=AttentionMask(causal=True),
                            impl="splash")
    with self.assertRaisesRegex(ValueError, "T=1, S=256"):
      dot_product_attention(q[:, :1], k, v, mask=AttentionMask(causal=True), impl="splash")

  @parameterized.product(head_dim=(64, 128), dtype=(jnp.float32, jnp.bfloat16))
  def test_lowers_for_tpu(self, head_dim, dtype):
    ids = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
    x = jax.ShapeDtypeStruct((2, 1024, 8, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((2, 1024, 2, head_dim), dtype)

    def loss(q, k, v, ids):
      mask = AttentionMask(causal=True, window=512, q_segment_ids=ids, kv_segment_ids=ids)
      out = attention_bundled.splash_attention(q, k, v, mask=mask, scale=0.1, interpret=False)
      return out.astype(jnp.float32).sum()

    step = lambda *args: jax.grad(loss, argnums=(0, 1, 2))(*args)  # noqa: E731
    text = lowering.export(step, "tpu", x, kv, kv, ids).mlir_module()
    # The forward, dq and dkv kernels.
    self.assertLen(re.findall(r"stablehlo\.custom_call @tpu_custom_call", text), 3)


class CudnnMappingTest(parameterized.TestCase):
  """`cudnn_attention`'s mapping of the mask onto jax.nn's arguments, run by jax.nn's XLA path."""

  @parameterized.product(mask=tuple(MASKS), heads=((4, 4), (4, 2)),
                         dtype=(jnp.float32, jnp.bfloat16))
  def test_mapping_matches_reference(self, mask, heads, dtype):
    q, k, v = random_inputs(6, 2, 200, 200, *heads, 32, dtype)
    spec = AttentionMask(**MASKS[mask])
    weight = jnp.asarray(np.random.default_rng(7).normal(size=q.shape), jnp.float32)
    mapped = lambda q, k, v: attention_bundled.cudnn_attention(  # noqa: E731
        q, k, v, mask=spec, scale=0.3, implementation="xla")
    reference = lambda q, k, v: attention_reference(q, k, v, mask=spec, scale=0.3)[0]  # noqa
    _assert_close(self, _grads(mapped, q, k, v, weight), _grads(reference, q, k, v, weight),
                  dtype)

  def test_refusals_name_the_reason(self):
    q = jax.ShapeDtypeStruct((1, 256, 4, 64), jnp.bfloat16)
    causal = AttentionMask(causal=True)
    unsupported = attention_bundled.cudnn_unsupported
    self.assertRegex(unsupported(q, causal, None, kv_length=256, return_lse=False),
                     "the backend is 'cpu'; cuDNN runs on NVIDIA GPUs")
    ids = jnp.ones((1, 256), jnp.int32)
    h100 = mock.Mock(compute_capability="9.0")
    with mock.patch.object(common, "backend", return_value="gpu"), \
         mock.patch.object(attention_bundled.jax, "devices", return_value=[h100]):
      self.assertIsNone(unsupported(q, causal, None, kv_length=256, return_lse=False))
      for reason, (query, mask, lse) in {
          "takes bfloat16 or float16, got float32": (q.update(dtype=jnp.float32), causal, False),
          "multiples of 8 up to 128, got 160": (q.update(shape=(1, 256, 4, 160)), causal, False),
          "takes no segment ids": (q, AttentionMask(q_segment_ids=ids, kv_segment_ids=ids),
                                   False),
          "not differentiable": (q, causal, True),
      }.items():
        self.assertRegex(unsupported(query, mask, None, kv_length=256, return_lse=lse), reason)
      self.assertRegex(unsupported(q, causal, None, kv_length=512, return_lse=False),
                       "self-attention only")
    with mock.patch.object(common, "backend", return_value="gpu"), \
         mock.patch.object(attention_bundled.jax, "devices",
                           return_value=[mock.Mock(compute_capability="7.5")]):
      self.assertRegex(unsupported(q, causal, None, kv_length=256, return_lse=False),
                       "compute capability >= 8.0, got 7.5")

  def test_cudnn_lowers(self):
    x = jax.ShapeDtypeStruct((2, 512, 8, 64), jnp.bfloat16)

    def loss(q, k, v):
      out = attention_bundled.cudnn_attention(q, k, v, mask=AttentionMask(causal=True),
                                              scale=0.125)
      return out.astype(jnp.float32).sum()

    try:
      text = lowering.export(jax.grad(loss, argnums=(0, 1, 2)), "cuda", x, x, x).mlir_module()
    except RuntimeError as e:
      if "cuDNN is not detected" not in str(e):
        raise
      self.skipTest("jax.nn's cuDNN path looks for an installed cuDNN while lowering, and this "
                    f"machine has none ({e}); the mapping is checked by "
                    "test_mapping_matches_reference instead")
    self.assertIn("cudnn", text)


class AutoRuleTest(absltest.TestCase):

  def test_preference_per_backend(self):
    # Real calls, resolved for another backend: the bundled kernel where it serves, else
    # longjax's flash kernel, else the XLA ops; never another backend's kernel.
    positions = jnp.arange(512)[None]
    alibi = AlibiBias(jnp.ones(4), positions, positions)
    unknown_bias = mock.Mock(spec=[])  # a bias no kernel computes

    def rule(backend, bias=None, t=512, dtype=jnp.bfloat16):
      x = jax.ShapeDtypeStruct((1, t, 4, 64), dtype)
      return resolve_call("auto", x, x, AttentionMask(causal=True), bias, block_size=128,
                          backend=backend).impl

    h100 = mock.Mock(compute_capability="9.0")
    with mock.patch.object(attention_bundled.jax, "devices", return_value=[h100]):
      for backend, library in (("tpu", "splash"), ("gpu", "cudnn")):
        self.assertEqual(rule(backend), library)
        self.assertEqual(rule(backend, alibi), "pallas")
        self.assertEqual(rule(backend, unknown_bias), "blockwise")
        self.assertEqual(rule(backend, unknown_bias, t=64), "reference")
      self.assertEqual(rule("gpu", dtype=jnp.float32), "pallas")  # cuDNN's flash: bf16/f16
    self.assertEqual(rule("cpu", unknown_bias), "blockwise")

  def test_dispatch_on_a_tpu(self):
    # With the backend patched to TPU, tracing (no lowering) shows which kernel "auto" calls:
    # splash's kernels are named after it, longjax's flash kernel after itself.
    q, k, v = random_inputs(8, 1, 256, 256, 2, 2, 64, jnp.float32)
    positions = jnp.arange(256)[None]
    alibi = AlibiBias(jnp.ones(2), positions, positions)

    def jaxpr(mask, bias=None):
      return str(jax.make_jaxpr(lambda q: dot_product_attention(q, k, v, mask=mask,
                                                                bias=bias))(q))

    with mock.patch.object(common, "backend", return_value="tpu"):
      causal = jaxpr(AttentionMask(causal=True))
      biased = jaxpr(AttentionMask(causal=True), alibi)
      sinks = jaxpr(AttentionMask(causal=True, window=64, global_tokens=4))
    self.assertIn("splash", causal)
    for other in (biased, sinks):
      self.assertNotIn("splash", other)
      self.assertIn("flash_attention", other)


if __name__ == "__main__":
  absltest.main()
