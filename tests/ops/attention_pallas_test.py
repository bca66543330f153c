"""`dot_product_attention(impl="pallas")`: the Pallas flash kernel behind the one dispatch point.

The kernel itself is tested against its own reference in tests/kernels; here the dispatcher's
translation of `AttentionMask` and the model's use of it are compared with the XLA
implementations (interpret mode on CPU).
"""

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas
from longjax import configuration
from longjax.models import build_model
from longjax.ops import AlibiBias, AttentionMask, dot_product_attention
from tests import testing
from tests.models.lm_test import TOLERANCE
from tests.models.lm_test import _forward
from tests.models.lm_test import decode_one_by_one
from tests.models.lm_test import tiny_model_config


def _inputs(t, s, kv_heads, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (2, t, 4, 16), dtype)
  k = jax.random.normal(keys[1], (2, s, kv_heads, 16), dtype)
  v = jax.random.normal(keys[2], (2, s, kv_heads, 16), dtype)
  return q, k, v


_SEGMENTS = jnp.asarray(np.repeat([[1] * 15 + [2] * 25], 2, axis=0), jnp.int32)
_MASKS = {
    "causal": lambda: AttentionMask(causal=True),
    "window_global": lambda: AttentionMask(causal=True, window=7, global_tokens=3),
    "segments": lambda: AttentionMask(causal=True, q_segment_ids=_SEGMENTS,
                                      kv_segment_ids=_SEGMENTS),
    "bidirectional_window": lambda: AttentionMask(causal=False, window=9),
}


class PallasDispatchTest(parameterized.TestCase):

  @parameterized.product(mask=list(_MASKS), kv_heads=[1, 2])
  def test_forward_lse_and_gradients_equal_reference(self, mask, kv_heads):
    q, k, v = _inputs(40, 40, kv_heads)
    spec = _MASKS[mask]()

    def loss(q, k, v, impl):
      out, lse = dot_product_attention(q, k, v, mask=spec, impl=impl, block_size=16,
                                       return_lse=True)
      return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        q, k, v, "pallas")
    (_, (ref_out, ref_lse)), ref_grads = jax.value_and_grad(
        loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, "reference")
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=0)
    for got, want in zip(grads, ref_grads):
      np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)

  def test_decode_offset_is_traced(self):
    q, k, v = _inputs(1, 40, 2)

    @jax.jit
    def step(offset):
      return dot_product_attention(q, k, v, mask=AttentionMask(causal=True, q_offset=offset),
                                   impl="pallas", block_size=16)

    for offset in (0, 17, 39):
      want = dot_product_attention(q, k, v, mask=AttentionMask(causal=True, q_offset=offset),
                                   impl="reference")
      np.testing.assert_allclose(step(jnp.int32(offset)), want, atol=2e-5, rtol=0)
    self.assertEqual(step._cache_size(), 1)  # pylint: disable=protected-access

  def test_decoding_uses_the_decode_kernel_and_training_the_flash_kernel(self):
    calls = []
    for name in ("decode_attention", "flash_attention"):
      original = getattr(kernels_pallas, name)
      patcher = mock.patch.object(kernels_pallas, name, side_effect=original)
      self.addCleanup(patcher.stop)
      calls.append(patcher.start())
    decode, flash = calls
    q, k, v = _inputs(2, 40, 2)
    dot_product_attention(q, k, v, mask=AttentionMask(causal=True, q_offset=30), impl="pallas",
                          block_size=16)
    self.assertEqual((decode.call_count, flash.call_count), (1, 0))
    q, k, v = _inputs(40, 40, 2)
    dot_product_attention(q, k, v, mask=AttentionMask(causal=True), impl="pallas", block_size=16)
    self.assertEqual((decode.call_count, flash.call_count), (1, 1))

  def test_a_bias_is_refused_in_one_line(self):
    q, k, v = _inputs(8, 8, 2)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
    with self.assertRaisesRegex(ValueError, "impl='pallas' cannot serve this call: it has no "
                                "in-kernel AlibiBias"):
      dot_product_attention(q, k, v, mask=AttentionMask(), impl="pallas",
                            bias=AlibiBias(jnp.ones(4), pos, pos))


class PallasModelTest(absltest.TestCase):

  def test_model_prefill_decode_and_gradients_match_blockwise(self):
    cfg = tiny_model_config(**{"attention.impl": "pallas", "attention.block_size": 16,
                               "num_kv_heads": 2})
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    cfg_xla = tiny_model_config(**{"attention.impl": "blockwise", "attention.block_size": 16,
                                   "num_kv_heads": 2})
    graphdef_xla, _ = nnx.split(build_model(cfg_xla, vocab_size=50, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 21)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    np.testing.assert_allclose(full, _forward(graphdef_xla, params, tokens)[0],
                               atol=TOLERANCE["float32"], rtol=0)
    decoded, _ = decode_one_by_one(graphdef, params, tokens[:, :6], model.init_cache(2, 32))
    np.testing.assert_allclose(decoded, full[:, :6], atol=TOLERANCE["float32"], rtol=0)

    def loss(params, graphdef):
      logits, _ = nnx.merge(graphdef, params)(tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grads = jax.grad(loss)(params, graphdef)
    grads_xla = jax.grad(loss)(params, graphdef_xla)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla)):
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)

  def test_config_refuses_bias_encodings_and_softplus(self):
    for overrides in ({"model.posenc.kind": "alibi"},
                      {"model.attention.normalizer": "softplus"}):
      with self.assertRaisesRegex(configuration.ConfigError, "model.attention.impl='pallas'"):
        configuration.validate(
            testing.tiny_config(**{"model.attention.impl": "pallas", **overrides}), 1)


if __name__ == "__main__":
  absltest.main()
