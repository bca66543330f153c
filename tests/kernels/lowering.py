"""Shared by the lowering tests: export a jitted function for TPU or CUDA on a CPU-only machine.

`jax.export` with an explicit platform runs the Pallas lowering of each kernel without the
device: for TPU a `tpu_custom_call` holding the kernel's Mosaic MLIR, for CUDA a Triton custom
call holding Triton IR. What this cannot check: the Mosaic layout passes and the Triton-to-PTX
compiler run only when XLA compiles for a real device (libtpu, the CUDA backend), so a shape
that lowers here may still be rejected there (or exceed VMEM / registers). No execution happens.
"""

import jax

TRITON_CALL = "__gpu$xla.gpu.triton"
# Per kernel variant: the platform it compiles for, the custom call its kernels become, and a
# head dim typical of the models that run there.
TARGETS = {"tpu": ("tpu", "tpu_custom_call", 128), "gpu": ("cuda", TRITON_CALL, 64)}


def export(fn, platform: str, *args):
  """`jax.export` of `jax.jit(fn)` for one platform ("tpu" or "cuda")."""
  # The Triton custom call has no serialisation-compatibility guarantee (its IR is tied to the
  # jaxlib version), which only matters when an export is stored; it is not stored here.
  return jax.export.export(
      jax.jit(fn), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
