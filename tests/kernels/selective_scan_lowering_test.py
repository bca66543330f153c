"""The selective scan lowers for TPU (Mosaic) and GPU (Triton) on a CPU-only machine.

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

from kernels_pallas.selective_scan import selective_scan

_TRITON_CALL = "__gpu$xla.gpu.triton"
_TARGETS = {"tpu": ("tpu", "tpu_custom_call"), "gpu": ("cuda", _TRITON_CALL)}
# A Mamba-1 layer's shapes: d_inner 1024 channels (on TPU lanes), state 16, 2k tokens.
_BATCH, _LENGTH, _CHANNELS, _STATE = 1, 2048, 1024, 16


def _export(fn, platform, *args):
  # The Triton custom call has no serialisation-compatibility guarantee (its IR is tied to the
  # jaxlib version), which only matters when an export is stored; it is not stored here.
  return jax.export.export(
      jax.jit(fn), platforms=[platform],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])(*args)


class LoweringTest(parameterized.TestCase):

  @parameterized.named_parameters(
      dict(testcase_name=f"{variant}_{jnp.dtype(dtype).name}_{mode}{'_grouped' * grouped}",
           variant=variant, dtype=dtype, mode=mode, grouped=grouped)
      for variant, dtype, mode, grouped in itertools.chain(
          itertools.product(("tpu", "gpu"), (jnp.float32, jnp.bfloat16), ("fwd", "bwd"),
                            (False,)),
          itertools.product(("tpu", "gpu"), (jnp.bfloat16,), ("bwd",), (True,))))
  def test_lowers(self, variant, dtype, mode, grouped):
    platform, custom_call = _TARGETS[variant]

    def forward(u, delta, a, b, c, d_skip, bias, h0):
      return selective_scan(u, delta, a, b, c, d_skip, delta_bias=bias, initial_state=h0,
                            interpret=False, backend=variant)

    fn = forward
    if mode == "bwd":
      def loss(*args):
        y, h = forward(*args)
        return y.astype(jnp.float32).sum() + h.sum()
      fn = jax.grad(loss, argnums=tuple(range(8)))
    shape = jax.ShapeDtypeStruct
    bc = (_BATCH, _LENGTH, 4, _STATE) if grouped else (_BATCH, _LENGTH, _STATE)
    x = shape((_BATCH, _LENGTH, _CHANNELS), dtype)
    channel = shape((_CHANNELS,), jnp.float32)
    exported = _export(fn, platform, x, x, shape((_CHANNELS, _STATE), jnp.float32),
                       shape(bc, dtype), shape(bc, dtype), channel, channel,
                       shape((_BATCH, _CHANNELS, _STATE), jnp.float32))
    # Forward: one kernel; backward: the forward (saving chunk-start states) and the backward.
    self.assertEqual(exported.mlir_module().count(f"stablehlo.custom_call @{custom_call}"),
                     1 if mode == "fwd" else 2)


if __name__ == "__main__":
  absltest.main()
