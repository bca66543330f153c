"""Flash attention lowers for TPU (Mosaic) and GPU (Triton) on a CPU-only machine.

What lowering does and does not check: `tests/kernels/lowering.py`.
"""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp

from kernels_pallas.flash.kernel import flash_attention
from tests.kernels import lowering

_TARGETS = lowering.TARGETS
_MASKS = {
    "causal": dict(),
    # Everything at once; q_offset is an argument so that it is traced, as when decoding.
    "all_features": dict(window=128, global_tokens=4, logit_soft_cap=30.0, alibi=True,
                         segments=True),
    # Position-based biases: per-token positions in, parameter gradients out (dq kernel).
    "alibi_positions": dict(bias_kind="alibi", positions=True, segments=True),
    "kerple_log_positions": dict(bias_kind="kerple_log", positions=True, window=128),
    "kerple_power_positions": dict(bias_kind="kerple_power", positions=True),
    # T5's 32 buckets (selects over the bucket runs) and FIRE's MLP (F = 32: P = 99 parameters
    # per head) from positions; bias-table / MLP gradients out of the dq kernel.
    "t5_positions": dict(bias_kind="t5", positions=True, segments=True),
    "t5_bidirectional": dict(bias_kind="t5", t5_bidirectional=True, causal=False, window=128),
    "fire_positions": dict(bias_kind="fire", positions=True),
    "fire_indices_wide": dict(bias_kind="fire", fire_hidden=48, window=128),  # P = 147 > 128
    # Landmark Attention's main softmax: integer div / rem of the tile's indices in-kernel.
    "landmarks": dict(landmark_block=50, segments=True),
}


def _bias_params(kind, n, fire_hidden):
  """Parameters of a bias kind (`flash_attention`'s `bias_params`) for N = n heads."""
  if kind == "alibi":
    return (jnp.linspace(0.5, 0.01, n),)
  if kind == "t5":
    return (jnp.linspace(-1.0, 1.0, 32 * n).reshape(32, n),)
  if kind == "fire":
    f = fire_hidden
    return (jnp.float32(0.1), jnp.float32(512.0), jnp.linspace(0.1, 1.0, f),
            jnp.linspace(-1.0, 0.0, f), jnp.linspace(-1.0, 1.0, f * n).reshape(f, n),
            jnp.zeros(n))
  return (jnp.linspace(0.5, 0.01, n),) * 2


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
    if kwargs.pop("positions", False):  # restarted per document, shifted by a traced offset
      positions = jnp.tile(jnp.arange(t // 4, dtype=jnp.int32), 4)[None]
      kwargs.update(q_positions=positions, kv_positions=positions)
    kind = kwargs.get("bias_kind")
    fire_hidden = kwargs.pop("fire_hidden", 32)
    params = () if kind is None else _bias_params(kind, n, fire_hidden)

    def forward(q, k, v, q_offset, params):
      return flash_attention(q, k, v, q_offset=q_offset, interpret=False, backend=variant,
                             bias_params=params or None, **kwargs)

    fn = forward
    if mode == "bwd":  # gradients of q, k, v and the bias parameters
      fn = jax.grad(lambda *args: forward(*args).astype(jnp.float32).sum(),
                    argnums=(0, 1, 2, 4) if params else (0, 1, 2))
    q = jax.ShapeDtypeStruct((b, t, n, h), dtype)
    kv = jax.ShapeDtypeStruct((b, t, kh, h), dtype)
    exported = lowering.export(fn, platform, q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32),
                               params)
    text = exported.mlir_module()
    # Forward: one kernel; backward: the forward again, then dq and dk/dv.
    self.assertEqual(text.count(f"stablehlo.custom_call @{custom_call}"),
                     1 if mode == "fwd" else 3)


if __name__ == "__main__":
  absltest.main()
