"""Chunked linear attention lowers for TPU (Mosaic) and GPU (Triton) on a CPU-only machine.

`jax.export` with an explicit platform runs the Pallas lowering of each kernel without the
device: for TPU a `tpu_custom_call` holding the kernel's Mosaic MLIR, for CUDA a Triton custom
call holding Triton IR. What this cannot check: the Mosaic layout passes and the Triton-to-PTX
compiler run only when XLA compiles for a real device (libtpu, the CUDA backend), so a shape
that lowers here may still be rejected there (or exceed VMEM / registers). No execution happens.
"""

import itertools
import re

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp

from kernels_pallas.linear_attention import linear_attention

_TRITON_CALL = "__gpu$xla.gpu.triton"
# Per variant: the platform it compiles for, the custom call its kernels become, a head dim
# typical of the models that run there.
_TARGETS = {"tpu": ("tpu", "tpu_custom_call", 128), "gpu": ("cuda", _TRITON_CALL, 64)}


def _export(fn, platform, *args):
  # The Triton custom call has no serialisation-compatibility guarantee (its IR is tied to the
  # jaxlib version), which only matters when an export is stored; it is not stored here.
  return jax.export.export(
      jax.jit(fn), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])(*args)


class LoweringTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name=f"{variant}_{decay}_{jnp.dtype(dtype).name}_{mode}", variant=variant,
           decay=decay, dtype=dtype, mode=mode)
      for variant, decay, dtype, mode in itertools.product(
          ("tpu", "gpu"), ("none", "constant", "data"), (jnp.float32, jnp.bfloat16),
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
    log_decay = jax.ShapeDtypeStruct((n,) if decay == "constant" else (b, t, n), jnp.float32)
    state = jax.ShapeDtypeStruct((b, n, d, d), jnp.float32)
    text = _export(fn, platform, x, x, x, log_decay, state).mlir_module()
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
