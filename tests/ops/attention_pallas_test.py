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
from longjax.ops import biases
from longjax.posenc import relative_bias
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
    "landmarks": lambda: AttentionMask(causal=True, landmark_block=6),
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

    # Jitted: one compiled program per impl instead of hundreds of op-by-op ones.
    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                      static_argnums=3)
    (_, (out, lse)), grads = grad_fn(q, k, v, "pallas")
    (_, (ref_out, ref_lse)), ref_grads = grad_fn(q, k, v, "reference")
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

    @jax.jit  # one compiled reference for the three offsets
    def reference(offset):
      return dot_product_attention(q, k, v, mask=AttentionMask(causal=True, q_offset=offset),
                                   impl="reference")

    for offset in (0, 17, 39):
      want = reference(jnp.int32(offset))
      np.testing.assert_allclose(step(jnp.int32(offset)), want, atol=2e-5, rtol=0)
    self.assertEqual(step._cache_size(), 1)  # pylint: disable=protected-access

  @parameterized.parameters(
      dict(rows=1, offset=39, window=None, global_tokens=0),
      dict(rows=3, offset=20, window=7, global_tokens=2),
      dict(rows=16, offset=0, window=None, global_tokens=0))
  def test_decode_call_gradients_equal_reference(self, rows, offset, window, global_tokens):
    # The decode kernel has no derivative; its custom VJP is the flash kernel's backward.
    q, k, v = _inputs(rows, 40, 2)
    spec = AttentionMask(causal=True, q_offset=jnp.int32(offset), window=window,
                         global_tokens=global_tokens)

    def loss(q, k, v, impl):
      out, lse = dot_product_attention(q, k, v, mask=spec, impl=impl, block_size=16,
                                       return_lse=True)
      return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    # Jitted (the kernel is called once, while tracing): one program per impl.
    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    decode = mock.patch.object(kernels_pallas, "decode_attention",
                               side_effect=kernels_pallas.decode_attention)
    with decode as decode_calls:
      grads = grad_fn(q, k, v, "pallas")
    self.assertEqual(decode_calls.call_count, 1)
    want = grad_fn(q, k, v, "reference")
    for got, ref in zip(grads, want):  # f32
      np.testing.assert_allclose(got, ref, atol=5e-5, rtol=0)
    # Keys past the last query's position get no gradient.
    np.testing.assert_array_equal(grads[1][:, offset + rows:], 0.0)

  def test_decoding_uses_the_decode_kernel_and_training_the_flash_kernel(self):
    calls = []
    for name in ("decode_attention", "flash_attention"):
      original = getattr(kernels_pallas, name)
      patcher = mock.patch.object(kernels_pallas, name, side_effect=original)
      self.addCleanup(patcher.stop)
      calls.append(patcher.start())
    decode, flash = calls
    # Each call jitted (one program, not one per op); the kernels are called while tracing.
    q, k, v = _inputs(2, 40, 2)
    jax.jit(lambda q, k, v: dot_product_attention(
        q, k, v, mask=AttentionMask(causal=True, q_offset=30), impl="pallas",
        block_size=16))(q, k, v)
    self.assertEqual((decode.call_count, flash.call_count), (1, 0))
    q, k, v = _inputs(40, 40, 2)
    jax.jit(lambda q, k, v: dot_product_attention(
        q, k, v, mask=AttentionMask(causal=True), impl="pallas", block_size=16))(q, k, v)
    self.assertEqual((decode.call_count, flash.call_count), (1, 1))
    # A biased decode call goes to the flash kernel (the decode kernel has no position biases).
    q, k, v = _inputs(2, 40, 2)
    pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    jax.jit(lambda q, k, v: dot_product_attention(
        q, k, v, mask=AttentionMask(causal=True, q_offset=30), impl="pallas", block_size=16,
        bias=AlibiBias(jnp.ones(4), pos[:, 30:32], pos)))(q, k, v)
    self.assertEqual((decode.call_count, flash.call_count), (1, 2))

  def test_other_biases_are_refused_in_one_line(self):
    q, k, v = _inputs(8, 8, 2)
    pos = jnp.broadcast_to(jnp.arange(8), (2, 8))

    class ZeroBias:  # a valid BlockBias with no kernel counterpart

      def block(self, q_start, q_size, kv_start, kv_size):
        del q_start, kv_start
        return jnp.zeros((1, 1, q_size, kv_size), jnp.float32)

    with self.assertRaisesRegex(ValueError, "impl='pallas' cannot serve this call: it has no "
                                "in-kernel ZeroBias; use impl='blockwise' or 'reference'$"):
      dot_product_attention(q, k, v, mask=AttentionMask(), impl="pallas", bias=ZeroBias())
    # KerpleBias kinds other than the kernel's ("log", "power") are refused too.
    with self.assertRaisesRegex(ValueError, "in-kernel KerpleBias"):
      dot_product_attention(q, k, v, mask=AttentionMask(), impl="pallas",
                            bias=biases.KerpleBias(r1=jnp.ones(4), r2=jnp.ones(4),
                                                   q_positions=pos, kv_positions=pos,
                                                   kind="gaussian"))

  @parameterized.named_parameters(
      ("alibi_restarted", "alibi", "restarted", 40),
      ("kerple_power_restarted", "kerple_power", "restarted", 40),
      ("kerple_log_decode", "kerple_log", "random", 3),  # T < S: the flash kernel, not decode
      ("t5_restarted", "t5", "restarted", 40),
      ("t5_bidirectional_decode", "t5_bidirectional", "random", 3),
      ("fire_restarted", "fire", "restarted", 40),
      ("fire_decode", "fire", "random", 3),
  )
  def test_position_biases_equal_reference(self, kind, positions, t):
    # Forward, lse and gradients of q, k, v and the bias parameters, with positions that are
    # restarted per packed document or random (sorted, non-contiguous).
    s = 40
    q, k, v = _inputs(t, s, 2)
    rng = np.random.RandomState(1)
    if positions == "restarted":
      pos = jnp.asarray(np.repeat([np.r_[np.arange(15), np.arange(25)]], 2, axis=0), jnp.int32)
      q_pos, kv_pos = pos[:, s - t:], pos
      mask = AttentionMask(causal=True, q_segment_ids=_SEGMENTS[:, s - t:],
                           kv_segment_ids=_SEGMENTS)
    else:
      kv_pos = jnp.asarray(np.sort(rng.randint(0, 120, (2, s)), axis=1), jnp.int32)
      q_pos = kv_pos[:, s - t:]
      mask = AttentionMask(causal=True, window=12, q_offset=s - t)
    n = q.shape[2]
    if kind == "alibi":
      params = (jnp.linspace(0.5, 0.02, n),)
      make_bias = lambda params: AlibiBias(params[0], q_pos, kv_pos)
    elif kind.startswith("t5"):
      params = (jnp.asarray(rng.normal(size=(16, n)), jnp.float32),)
      make_bias = lambda params: biases.T5Bias(
          table=params[0], q_positions=q_pos, kv_positions=kv_pos, max_distance=24,
          bidirectional=kind == "t5_bidirectional")
    elif kind == "fire":
      hidden = 3  # the kernel unrolls the MLP per hidden unit: few units compile faster
      w1 = jnp.asarray(np.abs(rng.normal(size=hidden)) + 0.5, jnp.float32)
      # A threshold at a query's position: max(L, i) ties there, and rows below it see L.
      params = relative_bias.FireParams(
          c=jnp.float32(0.2), threshold=jnp.float32(10 if t == s else q_pos[0, 1]),
          w1=w1, b1=-w1 * jnp.asarray(rng.uniform(size=hidden), jnp.float32),
          w2=jnp.asarray(rng.normal(size=(hidden, n)), jnp.float32),
          b2=jnp.asarray(rng.normal(size=n), jnp.float32))
      make_bias = lambda params: biases.FireBias(params=params, q_positions=q_pos,
                                                 kv_positions=kv_pos)
    else:
      params = (jnp.linspace(0.5, 1.5, n), jnp.linspace(0.3, 1.2, n))
      make_bias = lambda params: biases.KerpleBias(r1=params[0], r2=params[1],
                                                   q_positions=q_pos, kv_positions=kv_pos,
                                                   kind=kind[len("kerple_"):])

    def loss(q, k, v, params, impl):
      out, lse = dot_product_attention(q, k, v, mask=mask, bias=make_bias(params), impl=impl,
                                       block_size=16, return_lse=True)
      return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    # Jitted: one compiled program per impl instead of hundreds of op-by-op ones.
    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True),
                      static_argnums=4)
    (_, (out, lse)), grads = grad_fn(q, k, v, params, "pallas")
    (_, (ref_out, ref_lse)), ref_grads = grad_fn(q, k, v, params, "reference")
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=0)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=0)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      self.assertGreater(float(jnp.abs(want).max()), 1e-3)
      np.testing.assert_allclose(got, want, atol=5e-5 * max(1.0, float(jnp.abs(want).max())),
                                 rtol=0)


class PallasModelTest(parameterized.TestCase):

  # ALiBi, KERPLE, T5 and FIRE are computed in the flash kernel from the model's positions
  # (decode steps with a bias run the flash kernel too); the gradients include KERPLE's r1, r2,
  # T5's table and FIRE's MLP, c and threshold scale. ALiBi has no parameters, and its q/k/v
  # gradients are checked in PallasDispatchTest, so its model skips the (slow, interpreted)
  # gradient comparison.
  @parameterized.parameters("default", "alibi", "kerple_log", "t5", "fire")
  def test_model_prefill_decode_and_gradients_match_blockwise(self, posenc):
    # One layer: nothing here depends on depth, and decoding unrolls the layers (each one more
    # interpreted kernel to compile).
    overrides = {"num_kv_heads": 2, "attention.block_size": 16, "num_layers": 1}
    if posenc != "default":
      overrides["posenc.kind"] = posenc
    if posenc == "t5":  # 21 tokens reach the log-spaced buckets
      overrides.update({"posenc.t5_num_buckets": 8, "posenc.t5_max_distance": 16})
    if posenc == "fire":  # the kernel unrolls the MLP per hidden unit: 4 (of 32) compile faster
      overrides["posenc.fire_hidden"] = 4
    cfg = tiny_model_config(**{"attention.impl": "pallas", **overrides})
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    if posenc == "t5":  # the table starts at zero (a NoPE model): give each bucket a bias
      rng = np.random.RandomState(2)
      params = jax.tree_util.tree_map_with_path(
          lambda path, x: x + rng.normal(size=x.shape).astype(x.dtype)
          if "table" in jax.tree_util.keystr(path) else x, params)
    cfg_xla = tiny_model_config(**{"attention.impl": "blockwise", **overrides})
    graphdef_xla, _ = nnx.split(nnx.eval_shape(
        lambda: build_model(cfg_xla, vocab_size=50, rngs=nnx.Rngs(0))))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 21)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    np.testing.assert_allclose(full, _forward(graphdef_xla, params, tokens)[0],
                               atol=TOLERANCE["float32"], rtol=0)
    decoded, _ = decode_one_by_one(graphdef, params, tokens[:, :6], model.init_cache(2, 32))
    np.testing.assert_allclose(decoded, full[:, :6], atol=TOLERANCE["float32"], rtol=0)
    if posenc == "alibi":
      return

    def loss(params, graphdef):
      logits, _ = nnx.merge(graphdef, params)(tokens)
      return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grad_fn = jax.jit(jax.grad(loss), static_argnums=1)
    grads = grad_fn(params, graphdef)
    grads_xla = grad_fn(params, graphdef_xla)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla)):
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)

  def test_config_refuses_softplus_and_accepts_every_bias(self):
    with self.assertRaisesRegex(configuration.ConfigError, "model.attention.impl='pallas'"):
      configuration.validate(testing.tiny_config(**{
          "model.attention.impl": "pallas", "model.attention.normalizer": "softplus"}), 1)
    for kind in ("alibi", "kerple_log", "kerple_power", "t5", "fire"):
      configuration.validate(
          testing.tiny_config(**{"model.attention.impl": "pallas", "model.posenc.kind": kind}), 1)


if __name__ == "__main__":
  absltest.main()
