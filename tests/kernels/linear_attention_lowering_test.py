"""Chunked linear attention lowers for TPU (Mosaic) and GPU (Triton) on a CPU-only machine.

What lowering does and does not check: `tests/kernels/lowering.py`.
"""

import itertools
import re

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp

from kernels_pallas.linear.kernel import linear_attention
from tests.kernels import lowering

_TARGETS = lowering.TARGETS




class LoweringTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name=f"{variant}_{decay}_{jnp.dtype(dtype).name}_{mode}", variant=variant,
           decay=decay, dtype=dtype, mode=mode)
      for variant, decay, dtype, mode in itertools.product(
          ("tpu", "gpu"), ("none", "constant", "data", "channel"), (jnp.float32, jnp.bfloat16),
          ("fwd", "bwd")))
  def test_lowers(self, variant, decay, dtype, mode):
    platform, custom_call, d = _TARGETS[variant]
    b, t, n = 1, 2048, 4

    def forward(q, k, v, log_decay, state):
      return linear_attention(q, k, v, log_decay=None if decay == "none" else log_decay,
                              initial_state=state, interpret=False, backend=variant)

    fn = forward
    if mode == "bwd":
      def loss(*args):
        out, final = forward(*args)
        return out.astype(jnp.float32).sum() + final.sum()
      fn = jax.grad(loss, argnums=(0, 1, 2, 3, 4))
    x = jax.ShapeDtypeStruct((b, t, n, d), dtype)
    shapes = {"constant": (n,), "channel": (b, t, n, d)}
    log_decay = jax.ShapeDtypeStruct(shapes.get(decay, (b, t, n)), jnp.float32)
    state = jax.ShapeDtypeStruct((b, n, d, d), jnp.float32)
    text = lowering.export(fn, platform, x, x, x, log_decay, state).mlir_module()
    kernels = set(re.findall(r"linear_attention_(fwd|dq|dkv)\b", text))
    calls = text.count(f"stablehlo.custom_call @{custom_call}")
    if mode == "fwd":
      self.assertEqual((calls, kernels), (1, {"fwd"}))
    elif decay == "none":
      # The outputs are unused and the final state is only needed for the decay's gradient, so
      # XLA drops the forward kernel.
      self.assertEqual((calls, kernels), (2, {"dq", "dkv"}))
    else:
      self.assertEqual((calls, kernels), (3, {"fwd", "dq", "dkv"}))


if __name__ == "__main__":
  absltest.main()
