"""Landmark attention lowers for TPU (Mosaic) and GPU (Triton) on a CPU-only machine.

What lowering does and does not check: `tests/kernels/lowering.py`.
"""

import itertools
import re

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp

from kernels_pallas.landmark.kernel import landmark_attention
from tests.kernels import lowering

_TARGETS = lowering.TARGETS




class LoweringTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name=f"{variant}_{jnp.dtype(dtype).name}_{mode}"
           + ("_packed" if packed else ""), variant=variant, dtype=dtype, mode=mode,
           packed=packed)
      for variant, dtype, mode, packed in (
          *itertools.product(("tpu", "gpu"), (jnp.float32, jnp.bfloat16), ("fwd", "bwd"),
                             (False,)),
          # Segment ids (packed documents) add id blocks to every kernel.
          *itertools.product(("tpu", "gpu"), (jnp.bfloat16,), ("bwd",), (True,))))
  def test_lowers(self, variant, dtype, mode, packed):
    platform, custom_call, h = _TARGETS[variant]
    b, t, n, kh, landmark_block = 1, 2048, 4, 2, 64
    segments = jnp.repeat(jnp.arange(4, dtype=jnp.int32), t // 4)[None] if packed else None

    def forward(q, k, v):
      return landmark_attention(q, k, v, landmark_block=landmark_block, interpret=False,
                                backend=variant, segment_ids=segments)

    fn = forward
    if mode == "bwd":
      fn = jax.grad(lambda *args: forward(*args).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    q = jax.ShapeDtypeStruct((b, t, n, h), dtype)
    kv = jax.ShapeDtypeStruct((b, t, kh, h), dtype)
    text = lowering.export(fn, platform, q, kv, kv).mlir_module()
    kernels = set(re.findall(r"landmark_attention_(fwd|dq|dkv)\b", text))
    calls = text.count(f"stablehlo.custom_call @{custom_call}")
    # Backward: the forward (for out and lse), then dq and dk/dv.
    want = (1, {"fwd"}) if mode == "fwd" else (3, {"fwd", "dq", "dkv"})
    self.assertEqual((calls, kernels), want)


if __name__ == "__main__":
  absltest.main()
