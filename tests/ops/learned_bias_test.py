"""Learned-bias gradients: blockwise custom VJP == reference autodiff == finite differences.

Each bias spec is built from float parameters; the loss depends on q, k, v and those parameters
through `dot_product_attention`. The reference implementation is plain autodiff over the dense
definition; central finite differences of the same loss written out in float64 numpy (attention
and biases from the papers' formulas, `tests/posenc/reference_biases.py`) check that one in turn.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from longjax import posenc
from longjax.ops import AlibiBias
from longjax.ops import AttentionMask
from longjax.ops import FireBias
from longjax.ops import KerpleBias
from longjax.ops import T5Bias
from longjax.ops import dot_product_attention
from tests.ops.attention_test import as_f32
from tests.ops.attention_test import packed_segments
from tests.ops.attention_test import random_inputs
from tests.posenc import reference_biases

# (atol, rtol) for blockwise vs reference on values of order 1; gradients are compared on the
# scale of their largest entry. f32: summation order only. bf16: q, k, v and the probabilities
# (before the PV/dV matmuls) are rounded to bf16 in both, but at different places (the reference's
# autodiff also rounds dP to bf16, the blockwise backward keeps it in f32); a bias parameter's
# gradient sums the logits gradient over every (row, key) pair of its bucket/head, mostly
# cancelling (each row of ds sums to 0), so its error is a few bf16 ulps of the largest entry.
TOLERANCES = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (3e-2, 3e-2)}

KINDS = ("alibi", "t5", "t5_bidirectional", "kerple_log", "kerple_power", "fire")


def bias_params(kind: str, num_heads: int, seed: int = 0) -> dict:
  """Random float parameters of each bias kind (positive where the bias requires it)."""
  rng = np.random.default_rng(seed)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  if kind == "alibi":
    return {"slopes": f32(rng.uniform(0.05, 0.5, num_heads))}
  if kind.startswith("t5"):
    return {"table": f32(rng.normal(size=(16, num_heads)))}
  if kind.startswith("kerple"):
    return {"r1": f32(rng.uniform(0.2, 2.0, num_heads)),
            "r2": f32(rng.uniform(0.2, 1.5, num_heads))}
  hidden = 8
  return {"fire": posenc.FireParams(
      c=f32(0.3), threshold=f32(6.0), w1=f32(rng.normal(size=hidden)),
      b1=f32(rng.normal(size=hidden) * 0.3), w2=f32(rng.normal(size=(hidden, num_heads))),
      b2=f32(rng.normal(size=num_heads)))}


def make_bias(kind: str, p: dict, q_positions, kv_positions):
  """The spec of `kind` from parameters `p` at the given positions."""
  pos = dict(q_positions=q_positions, kv_positions=kv_positions)
  if kind == "alibi":
    return AlibiBias(p["slopes"], q_positions, kv_positions)
  if kind.startswith("t5"):
    # max_distance 20 < the lengths used, so the shared last bucket is exercised too.
    return T5Bias(table=p["table"], max_distance=20,
                  bidirectional=kind == "t5_bidirectional", **pos)
  if kind.startswith("kerple"):
    return KerpleBias(r1=p["r1"], r2=p["r2"], kind=kind.split("_")[1], **pos)
  return FireBias(params=p["fire"], **pos)


def positions(batch: int, length: int, offset: int = 0):
  """Row 0 counts from `offset`; row 1 restarts at 0 a third of the way (a packed document)."""
  pos = np.tile(offset + np.arange(length), (batch, 1))
  if batch > 1:
    cut = length // 3
    pos[1, cut:] = np.arange(length - cut)
  return jnp.asarray(pos, jnp.int32)


def loss_fn(impl: str, mask, kind: str, q_pos, kv_pos, block_size=16):
  """loss(q, k, v, params) using both outputs with distinct cotangents everywhere."""

  def loss(q, k, v, p):
    out, lse = dot_product_attention(q, k, v, mask=mask, bias=make_bias(kind, p, q_pos, kv_pos),
                                     impl=impl, block_size=block_size, return_lse=True)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * w) + 0.3 * jnp.sum(jnp.sin(finite_lse))

  return loss


def grads(impl, mask, kind, q, k, v, p, q_pos, kv_pos):
  loss = loss_fn(impl, mask, kind, q_pos, kv_pos)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, p)


def numpy_bias(kind: str, p: dict, q_pos, kv_pos) -> np.ndarray:
  """float64 [B, N, T, S] from the papers' formulas, with the settings of `make_bias`."""
  if kind == "alibi":
    return reference_biases.alibi(p["slopes"], q_pos, kv_pos)
  if kind.startswith("t5"):
    return reference_biases.t5(p["table"], q_pos, kv_pos, 20, kind == "t5_bidirectional")
  if kind.startswith("kerple"):
    return reference_biases.kerple(p["r1"], p["r2"], q_pos, kv_pos, kind.split("_")[1])
  return reference_biases.fire(*p["fire"], q_pos, kv_pos)


def numpy_loss(q, k, v, bias, visible) -> float:
  """The loss of `loss_fn` in float64: dense GQA softmax attention over a [B, 1, T, S] mask."""
  b, t, n, h = q.shape
  group = n // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)  # head n -> kv head n // G
  logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h) + bias
  logits = np.where(visible, logits, -np.inf)
  m = logits.max(axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.exp(logits - m)
  total = e.sum(axis=-1, keepdims=True)
  probs = e / np.where(total > 0, total, 1.0)
  out = np.einsum("bnts,bsnh->btnh", probs, v)
  lse = np.where(total[..., 0] > 0, (m + np.log(np.where(total > 0, total, 1.0)))[..., 0], 0.0)
  w = np.cos(np.arange(out.size, dtype=np.float32)).astype(np.float64).reshape(out.shape)
  return float(np.sum(out * w) + 0.3 * np.sum(np.sin(lse)))


class LearnedBiasGradientTest(parameterized.TestCase):

  def assert_close(self, got, want, atol, rtol, name):
    scale = max(1.0, float(np.abs(as_f32(want)).max()))
    np.testing.assert_allclose(as_f32(got), as_f32(want), atol=atol * scale, rtol=rtol,
                               err_msg=name)

  def check(self, kind, dtype, mask, t, s, q_offset=0):
    # GQA (4 query heads on 2 kv heads); lengths not multiples of the block (16): padded rows and
    # keys, whose bias entries are finite but must contribute nothing.
    batch, n = 2, 4
    q, k, v = random_inputs(3, batch, t, s, n, 2, 8, dtype)
    q_pos, kv_pos = positions(batch, t, q_offset), positions(batch, s)
    p = bias_params(kind, n)
    atol, rtol = TOLERANCES[dtype]
    loss, g = grads("blockwise", mask, kind, q, k, v, p, q_pos, kv_pos)
    ref_loss, ref_g = grads("reference", mask, kind, q, k, v, p, q_pos, kv_pos)
    np.testing.assert_allclose(loss, ref_loss, rtol=max(rtol, 1e-5))
    for name, a, b in zip("qkv", g[:3], ref_g[:3]):
      self.assert_close(a, b, atol, rtol, f"d{name}")
    flat, ref_flat = jax.tree.leaves(g[3]), jax.tree.leaves(ref_g[3])
    self.assertLen(flat, len(ref_flat))
    for a, b in zip(flat, ref_flat):
      self.assertEqual(a.dtype, jnp.float32)
      self.assertTrue(np.abs(as_f32(b)).max() > 0)  # the parameter does reach the loss
      self.assert_close(a, b, atol, rtol, f"d{kind}")
    return q, k, v, p, q_pos, kv_pos, ref_g[3]

  @parameterized.product(kind=KINDS, dtype=(jnp.float32,))
  def test_blockwise_equals_reference_equals_finite_differences(self, kind, dtype):
    causal = kind != "t5_bidirectional"
    mask = AttentionMask(causal=causal)
    t = s = 37
    q, k, v, p, q_pos, kv_pos, ref_dp = self.check(kind, dtype, mask, t, s)
    # Central differences of the float64 loss along one random direction per parameter leaf.
    f64 = lambda x: np.asarray(x, np.float64)
    qn, kn, vn = f64(q), f64(k), f64(v)
    visible = np.asarray(mask.dense(t, s))
    leaves, treedef = jax.tree.flatten(jax.tree.map(f64, p))
    loss = lambda leaves: numpy_loss(qn, kn, vn, numpy_bias(kind, treedef.unflatten(leaves),
                                                            q_pos, kv_pos), visible)
    np.testing.assert_allclose(loss(leaves), float(loss_fn("reference", mask, kind, q_pos,
                                                           kv_pos)(q, k, v, p)), rtol=1e-5)
    rng = np.random.default_rng(5)
    for i, grad in enumerate(jax.tree.leaves(ref_dp)):
      u = rng.normal(size=np.shape(leaves[i]))
      u /= np.linalg.norm(u)
      eps = 1e-6  # float64: rounding ~1e-16 |L| / eps; FIRE's ReLU kinks are rarely crossed

      def shifted(sign, i=i, u=u):
        moved = list(leaves)
        moved[i] = leaves[i] + sign * eps * u
        return loss(moved)

      fd = (shifted(1) - shifted(-1)) / (2 * eps)
      np.testing.assert_allclose(np.sum(f64(grad) * u), fd, rtol=1e-3, atol=1e-4,
                                 err_msg=f"{kind} leaf {i}")

  @parameterized.parameters("t5", "fire")
  def test_bfloat16(self, kind):
    self.check(kind, jnp.bfloat16, AttentionMask(causal=True), 37, 37)

  @parameterized.parameters("t5", "kerple_power", "fire")
  def test_masks_that_skip_blocks(self, kind):
    # Window + leading keys + packed segments: skipped blocks and hidden entries contribute no
    # gradient (the reference sees them as -inf logits with zero cotangent).
    seg = packed_segments(np.random.default_rng(4), 2, 70)
    mask = AttentionMask(causal=True, window=13, global_tokens=3, q_segment_ids=seg,
                         kv_segment_ids=seg)
    self.check(kind, jnp.float32, mask, 70, 70)

  @parameterized.parameters("t5", "kerple_log")
  def test_decode_offset(self, kind):
    # 5 new queries at absolute indices 32..36 of a 37-key cache (the decode layout).
    self.check(kind, jnp.float32, AttentionMask(causal=True, q_offset=jnp.int32(32)), 5, 37,
               q_offset=32)

  def test_frozen_bias_gets_no_gradient_work(self):
    # A bias under stop_gradient is a constant: the blockwise backward does not pull back
    # through it (no scatter-add for the T5 table in the compiled backward pass).
    q, k, v = random_inputs(0, 1, 40, 40, 2, 2, 8, jnp.float32)
    pos = positions(1, 40)
    table = bias_params("t5", 2)["table"]

    def hlo(frozen):
      def loss(q, table):
        table = jax.lax.stop_gradient(table) if frozen else table
        bias = T5Bias(table=table, q_positions=pos, kv_positions=pos, max_distance=20)
        return dot_product_attention(q, k, v, mask=AttentionMask(), bias=bias,
                                     impl="blockwise", block_size=16).sum()
      return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(q, table).as_text()

    self.assertIn("scatter", hlo(False))
    self.assertNotIn("scatter", hlo(True))

  def test_memory_stays_linear_with_a_learned_bias(self):
    # Compiled temp memory of fwd+bwd (grads of q, k, v and the T5 table) is O(T*C): doubling T
    # roughly doubles it, and the learned bias adds per-block intermediates, not a [T, S] array.
    def temp_bytes(length, with_bias):
      x = jax.ShapeDtypeStruct((1, length, 2, 32), jnp.float32)
      table = jax.ShapeDtypeStruct((32, 2), jnp.float32)
      pos = jnp.arange(length, dtype=jnp.int32)[None]

      def loss(q, k, v, table):
        bias = T5Bias(table=table, q_positions=pos, kv_positions=pos) if with_bias else None
        return dot_product_attention(q, k, v, mask=AttentionMask(causal=True), bias=bias,
                                     impl="blockwise", block_size=128).sum()

      compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(x, x, x, table).compile()
      return compiled.memory_analysis().temp_size_in_bytes

    with_bias = temp_bytes(4096, True)
    self.assertLess(with_bias / temp_bytes(2048, True), 2.5)
    # A [T, S] f32 array alone would be 64 MiB at T = S = 4096.
    self.assertLess(with_bias - temp_bytes(4096, False), 8 * 2**20)


if __name__ == "__main__":
  absltest.main()
