"""Flash attention lowers for TPU (Mosaic) and GPU (Triton) on a CPU-only machine.

`jax.export` with an explicit platform runs the Pallas lowering of each kernel without the
device: for TPU it produces a `tpu_custom_call` holding the Mosaic MLIR of the kernel, for CUDA a
Triton custom call holding Triton IR. What this cannot check: the Mosaic layout passes and the
Triton-to-PTX compiler run only when XLA compiles for a real device (libtpu, the CUDA backend),
so a shape that lowers here may still be rejected there. No execution happens.
"""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp

from kernels_pallas.flash_attention import flash_attention

_TRITON_CALL = "__gpu$xla.gpu.triton"
# Per variant: the platform it compiles for, the custom call its kernels become, a head dim
# typical of the models that run there.
_TARGETS = {"tpu": ("tpu", "tpu_custom_call", 128), "gpu": ("cuda", _TRITON_CALL, 64)}
_MASKS = {
    "causal": dict(),
    # Everything at once; q_offset is an argument so that it is traced, as when decoding.
    "all_features": dict(window=128, global_tokens=4, logit_soft_cap=30.0, alibi=True,
                         segments=True),
}


def _export(fn, platform, *args):
  # The Triton custom call has no serialisation-compatibility guarantee (its IR is tied to the
  # jaxlib version), which only matters when an export is stored; it is not stored here.
  return jax.export.export(
      jax.jit(fn), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])(*args)


class LoweringTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name=f"{variant}_{mask}_{jnp.dtype(dtype).name}_{mode}", variant=variant,
           mask=mask, dtype=dtype, mode=mode)
      for variant, mask, dtype, mode in itertools.product(
          ("tpu", "gpu"), _MASKS, (jnp.float32, jnp.bfloat16), ("fwd", "bwd")))
  def test_lowers(self, variant, mask, dtype, mode):
    platform, custom_call, h = _TARGETS[variant]
    b, t, n, kh = 1, 512, 4, 2
    kwargs = dict(_MASKS[mask])
    if kwargs.pop("alibi", False):
      kwargs["alibi_slopes"] = jnp.linspace(0.5, 0.01, n)
    if kwargs.pop("segments", False):
      ids = jnp.repeat(jnp.arange(4, dtype=jnp.int32), t // 4)[None]
      kwargs.update(q_segment_ids=ids, kv_segment_ids=ids)

    def forward(q, k, v, q_offset):
      return flash_attention(q, k, v, q_offset=q_offset, interpret=False, backend=variant,
                             **kwargs)

    fn = forward
    if mode == "bwd":
      fn = jax.grad(lambda *args: forward(*args).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    q = jax.ShapeDtypeStruct((b, t, n, h), dtype)
    kv = jax.ShapeDtypeStruct((b, t, kh, h), dtype)
    exported = _export(fn, platform, q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32))
    text = exported.mlir_module()
    # Forward: one kernel; backward: the forward again, then dq and dk/dv.
    self.assertEqual(text.count(f"stablehlo.custom_call @{custom_call}"),
                     1 if mode == "fwd" else 3)


if __name__ == "__main__":
  absltest.main()
