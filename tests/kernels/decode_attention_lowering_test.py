"""Decode attention lowers for TPU (Mosaic) and GPU (Triton) on a CPU-only machine.

What lowering does and does not check: `tests/kernels/lowering.py`.
"""

import itertools
import re

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp

from kernels_pallas.decode.kernel import decode_attention
from tests.kernels import lowering

# Per variant: the platform it compiles for, the custom call its kernel becomes, a head dim
# typical of the models that run there.
_TARGETS = lowering.TARGETS
_MASKS = {
    "causal": dict(),
    "all_features": dict(window=1024, global_tokens=4, logit_soft_cap=30.0, alibi=True),
}
# (B, T, S): a single token against an 8k cache, and a few drafted tokens per sequence with
# per-sequence cache lengths.
_SHAPES = {"t1": (1, 1, 8192), "t4_b2": (2, 4, 8192)}




class LoweringTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name=f"{variant}_{mask}_{shape}_{jnp.dtype(dtype).name}_{splits}",
           variant=variant, mask=mask, shape=shape, dtype=dtype, num_splits=splits)
      for variant, mask, shape, dtype, splits in itertools.product(
          ("tpu", "gpu"), _MASKS, _SHAPES, (jnp.float32, jnp.bfloat16), (None, 4)))
  def test_lowers(self, variant, mask, shape, dtype, num_splits):
    platform, custom_call, h = _TARGETS[variant]
    b, t, s = _SHAPES[shape]
    n, kh = 8, 2
    kwargs = dict(_MASKS[mask])
    if kwargs.pop("alibi", False):
      kwargs["alibi_slopes"] = jnp.linspace(0.5, 0.01, n)

    def forward(q, k, v, cache_length):
      return decode_attention(q, k, v, cache_length=cache_length, num_splits=num_splits,
                              interpret=False, backend=variant, **kwargs)

    kv = jax.ShapeDtypeStruct((b, s, kh, h), dtype)
    length = jax.ShapeDtypeStruct(() if b == 1 else (b,), jnp.int32)
    exported = lowering.export(forward, platform, jax.ShapeDtypeStruct((b, t, n, h), dtype), kv, kv,
                       length)
    text = exported.mlir_module()
    self.assertEqual(text.count(f"stablehlo.custom_call @{custom_call}"), 1)
    # No op outside the kernel touches a cache-sized array (reshapes are free).
    copies = [line for line in text.splitlines()
              if re.search(r"stablehlo\.(transpose|pad|concatenate|slice|gather)", line)
              and f"x{s}x" in line]
    self.assertEmpty(copies)

  def test_tpu_head_dim_64_lowers_through_a_head_major_copy(self):
    # A (block_k, 64) tile of one head is not a legal Mosaic block of the [B, S, K * H] view,
    # so the wrapper transposes the cache to [B, K, S, H]: it lowers, at the cost of a copy.
    kv = jax.ShapeDtypeStruct((1, 8192, 2, 64), jnp.bfloat16)
    text = lowering.export(lambda q, k, v, n: decode_attention(q, k, v, cache_length=n,
                                                               interpret=False, backend="tpu"),
                   "tpu", jax.ShapeDtypeStruct((1, 1, 8, 64), jnp.bfloat16), kv, kv,
                   jax.ShapeDtypeStruct((), jnp.int32)).mlir_module()
    self.assertEqual(text.count("stablehlo.custom_call @tpu_custom_call"), 1)
    cache_transposes = [line for line in text.splitlines()
                        if "stablehlo.transpose" in line and "x8192x" in line]
    self.assertLen(cache_transposes, 2)  # k and v


if __name__ == "__main__":
  absltest.main()
