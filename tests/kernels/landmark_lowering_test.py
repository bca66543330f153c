"""Landmark attention lowers for TPU (Mosaic) and GPU (Triton) on a CPU-only machine.

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

from kernels_pallas.landmark import landmark_attention

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
      dict(testcase_name=f"{variant}_{jnp.dtype(dtype).name}_{mode}", variant=variant,
           dtype=dtype, mode=mode)
      for variant, dtype, mode in itertools.product(
          ("tpu", "gpu"), (jnp.float32, jnp.bfloat16), ("fwd", "bwd")))
  def test_lowers(self, variant, dtype, mode):
    platform, custom_call, h = _TARGETS[variant]
    b, t, n, kh, block_len = 1, 2048, 4, 2, 64

    def forward(q, k, v):
      return landmark_attention(q, k, v, block_len=block_len, interpret=False, backend=variant)

    fn = forward
    if mode == "bwd":
      fn = jax.grad(lambda *args: forward(*args).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    q = jax.ShapeDtypeStruct((b, t, n, h), dtype)
    kv = jax.ShapeDtypeStruct((b, t, kh, h), dtype)
    text = _export(fn, platform, q, kv, kv).mlir_module()
    kernels = set(re.findall(r"landmark_attention_(fwd|dq|dkv)\b", text))
    calls = text.count(f"stablehlo.custom_call @{custom_call}")
    # Backward: the forward (for out and lse), then dq and dk/dv.
    want = (1, {"fwd"}) if mode == "fwd" else (3, {"fwd", "dq", "dkv"})
    self.assertEqual((calls, kernels), want)


if __name__ == "__main__":
  absltest.main()
