"""The selective scan lowers for TPU (Mosaic) and GPU (Triton) on a CPU-only machine.

What lowering does and does not check: `tests/kernels/lowering.py`.
"""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp

from kernels_pallas.scan.kernel import selective_scan
from tests.kernels import lowering

_TARGETS = {"tpu": ("tpu", "tpu_custom_call"), "gpu": ("cuda", lowering.TRITON_CALL)}
# A Mamba-1 layer's shapes: d_inner 1024 channels (on TPU lanes), state 16, 2k tokens.
_BATCH, _LENGTH, _CHANNELS, _STATE = 1, 2048, 1024, 16




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
    exported = lowering.export(fn, platform, x, x, shape((_CHANNELS, _STATE), jnp.float32),
                       shape(bc, dtype), shape(bc, dtype), channel, channel,
                       shape((_BATCH, _CHANNELS, _STATE), jnp.float32))
    # Forward: one kernel; backward: the forward (saving chunk-start states) and the backward.
    self.assertEqual(exported.mlir_module().count(f"stablehlo.custom_call @{custom_call}"),
                     1 if mode == "fwd" else 2)


if __name__ == "__main__":
  absltest.main()
