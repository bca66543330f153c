"""Softplus attention with l1 normalisation and re-weighting (LSSA and LSSAR).

Gao, Spratling & Gionfrida, "Softplus Attention with Re-weighting Boosts Length Extrapolation in
Large Language Models" (arXiv 2501.13428). Softmax is exp() followed by an l1 normalisation of
each row; the paper keeps the normalisation and replaces exp() by softplus (its "normalisation"
stage, LSSA), then optionally sharpens the normalised row (its "sharpening" stage, re-weighting,
LSSAR). For query t with N_t visible keys:

  x_tj = scale * q_t.k_j + bias_tj                                   (plain logits), or
  x_tj = log(H) * log(N_t) * cos(q_t, k_j) + bias_tj                 (`length_scale`: LSSA)
  w_tj = softplus(x_tj) / sum_j' softplus(x_tj')                     (l1 normalisation)
  r_tj = relu(N_t w_tj - o_t)^p / sum_j' relu(N_t w_tj' - o_t)^p     (re-weighting, p > 0)
  out_t = sum_j r_tj v_j   (w instead of r without re-weighting)

Sums run over the visible keys j. `length_scale` is the paper's dynamic scale factor: q and k are
l2-normalised, so the cosine lies in [-1, 1], and log(N_t) grows the logits with the number of
keys the row normalises over (entropy invariance, Chiang & Cholak 2022). N_t is the number of
keys the mask lets query t see (position + 1 under plain causal masking; min(position + 1,
window) with a sliding window; within its own document with segment ids), which is also the count
the l1 normalisation runs over. The offset o_t is 1 ("above the uniform weight 1 / N_t") except
for rows with N_t <= 3, where the paper sets it to 0 (its bias matrix has zero first rows; with
one key, N w - 1 = 0 would erase the row). The power p sharpens the surviving weights (paper
defaults: 15 for long contexts, 3 at the training length).

Blockwise algebra. r depends on the whole row only through N_t w_tj - o_t = (N_t s_tj - o_t Z_t)
/ Z_t with s = softplus(x) and Z_t = sum_j s_tj, and the 1 / Z_t^p factor cancels in the
normalisation of r. So a first pass over the key blocks gets Z_t (and the LSSA output), and a
second pass accumulates r as an online softmax of y_tj = p log relu(N_t w_tj - o_t): exp and a
running maximum keep u^p finite, where u^p itself overflows float32 for p = 15 once N > 370.

Edge cases. A row without a visible key outputs zeros (its Z is 0). A row where every
relu(N_t w_tj - o_t) is 0 is exactly uniform (all w = 1 / N_t, as they sum to 1); re-weighting
leaves it unchanged (r = w) instead of dividing 0 by 0. softplus(x) underflows to 0 below
x ~ -100 in float32, so a row whose logits all lie below that outputs zeros; the cosine logits of
LSSA are bounded by log(H) log(N), far from it.

Shapes and precision follow `longjax.ops.dot_product_attention`: q [B, T, N, H], k and v
[B, S, K, H] with N % K == 0 (query head n reads kv head n // (N // K), K/V never repeated in
memory), logits and normalisers in float32, matmuls in the input dtype with float32
accumulation. Inside, heads come before length: q [B, K, G, T, H], k and v [B, K, S, H].
"""

import math

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import common
from kernels_pallas import softmax
from longjax.ops import dispatch
from longjax.ops.attention import AttentionCall
from longjax.ops.attention import check_qkv
from longjax.ops.attention import default_block_size
from longjax.ops.attention import dense_passed_over
from longjax.ops.masks import AttentionMask

# Rows that see at most this many keys re-weight without the offset (o_t = 0), as in the paper.
UNSHIFTED_ROWS = 3
# Keeps the l2 normalisation of an all-zero query or key finite (its cosines become 0).
_NORM_EPS = 1e-12


def _l2_normalize(x: jax.Array) -> jax.Array:
  """x / ||x|| over the head dim, computed in float32 and returned in x.dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * lax.rsqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + _NORM_EPS)).astype(x.dtype)


def _groups(x: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B|1, N|1, q, s] -> [B|1, K|1, G|1, q, s], splitting query heads into (kv head, group)."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], num_kv_heads, x.shape[1] // num_kv_heads, *x.shape[2:])


def _row_factor(counts: jax.Array, scale: float, length_scale: bool) -> jax.Array:
  """The logit multiplier of each row, f32 like `counts`: scale, times log(N_t) with LSSA."""
  if not length_scale:
    return jnp.full(counts.shape, scale, jnp.float32)
  # log(1) = 0: a row with one key has the single weight 1 whatever its logit.
  return scale * jnp.log(jnp.maximum(counts, 1.0))


def _softplus_block(q_blk, k_blk, factor, visible, bias_blk):
  """softplus of one block's logits, 0 where hidden: f32 [B, K, G, Cq, Ckv].

  Args:
    q_blk: [B, K, G, Cq, H] (l2-normalised under LSSA).
    k_blk: [B, K, Ckv, H].
    factor: f32 [B|1, 1, 1, Cq], the row multipliers of `_row_factor`.
    visible: bool [B|1, 1, 1, Cq, Ckv].
    bias_blk: None or f32 [B|1, N|1, Cq, Ckv].
  """
  x = jnp.einsum("bkgqh,bksh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
  x = x * factor[..., None]
  if bias_blk is not None:
    x = x + _groups(bias_blk, k_blk.shape[1])
  # Hidden logits stay finite (no -inf), so the unselected branch has finite gradients.
  return jnp.where(visible, jax.nn.softplus(x), 0.0)


def _sharpening_logits(s, z_safe, counts, visible, power: float):
  """y = p log relu(N_t w_tj - o_t) with w = s / Z; -inf where that relu is 0 or hidden.

  r = softmax_j(y) is the re-weighted row (see the module docstring).

  Args:
    s: f32 [B, K, G, Cq, Ckv] softplus values (0 where hidden).
    z_safe: f32 [B, K, G, Cq] row sums Z_t (1 where a row has no key).
    counts: f32 [B|1, 1, 1, Cq] visible keys N_t.
    visible: bool [B|1, 1, 1, Cq, Ckv].
    power: p.
  """
  offset = jnp.where(counts > UNSHIFTED_ROWS, 1.0, 0.0)
  u = counts[..., None] * (s / z_safe[..., None]) - offset[..., None]
  positive = visible & (u > 0)
  # Two wheres: log never sees a non-positive value, so no NaN reaches the gradients.
  return jnp.where(positive, power * jnp.log(jnp.where(positive, u, 1.0)), -jnp.inf)


def _prepare(q, k, scale, length_scale):
  """(q [B, K, G, T, H], k [B, K, S, H], scale) with LSSA's l2 normalisation applied."""
  b, t, n, h = q.shape
  nk = k.shape[2]
  if length_scale:
    q, k = _l2_normalize(q), _l2_normalize(k)
  if scale is None:
    scale = math.log(h) if length_scale else h ** -0.5
  qg = q.reshape(b, t, nk, n // nk, h).transpose(0, 2, 3, 1, 4)
  return qg, k.transpose(0, 2, 1, 3), float(scale)


def softplus_attention_weights(q: jax.Array, k: jax.Array, *, mask: AttentionMask, bias=None,
                               scale: float | None = None, length_scale: bool = False,
                               reweight_power: float = 0.0) -> jax.Array:
  """The dense attention weights (w, or r with re-weighting); for the reference and tests.

  Args: as for `softplus_attention` (no v).

  Returns:
    f32 [B, N, T, S]; each row sums to 1 over its visible keys, or is all 0 without any.
  """
  b, t, n, _ = q.shape
  s = k.shape[1]
  qg, kt, scale = _prepare(q, k, scale, length_scale)
  visible = mask.dense(t, s)[:, :, None]  # [B|1, 1, 1, T, S]
  counts = visible.sum(axis=-1, dtype=jnp.int32).astype(jnp.float32)
  bias_full = None if bias is None else bias.block(0, t, 0, s)
  sp = _softplus_block(qg, kt, _row_factor(counts, scale, length_scale), visible, bias_full)
  z = sp.sum(axis=-1)
  z_safe = jnp.where(z > 0, z, 1.0)
  weights = sp / z_safe[..., None]
  if reweight_power:
    y = _sharpening_logits(sp, z_safe, counts, visible, reweight_power)
    m = lax.stop_gradient(y.max(axis=-1, keepdims=True))
    sharpened = jnp.isfinite(m)
    e = jnp.exp(y - jnp.where(sharpened, m, 0.0))
    l = e.sum(axis=-1, keepdims=True)
    weights = jnp.where(sharpened, e / jnp.where(sharpened, l, 1.0), weights)
  return weights.reshape(b, n, t, s)


def softplus_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                 mask: AttentionMask, bias=None, scale: float | None = None,
                                 length_scale: bool = False,
                                 reweight_power: float = 0.0) -> jax.Array:
  """Dense softplus attention, the plain definition; materialises [B, N, T, S] weights.

  Args: as for `softplus_attention`.

  Returns:
    out [B, T, N, H] in q.dtype.
  """
  b, t, n, h = q.shape
  s, nk = k.shape[1], k.shape[2]
  weights = softplus_attention_weights(q, k, mask=mask, bias=bias, scale=scale,
                                       length_scale=length_scale, reweight_power=reweight_power)
  out = jnp.einsum("bkgts,bskh->btkgh", weights.astype(v.dtype).reshape(b, nk, n // nk, t, s),
                   v, preferred_element_type=jnp.float32)
  return out.reshape(b, t, n, h).astype(q.dtype)


def softplus_attention_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, *,
                                 mask: AttentionMask, bias=None, scale: float | None = None,
                                 length_scale: bool = False, reweight_power: float = 0.0,
                                 block_size: int) -> jax.Array:
  """Blockwise softplus attention: O(T * C) memory forward, O((T + S) * H + C^2) backward.

  A `lax.map` over query blocks, each a scan over key blocks: one pass counts the visible keys
  N_t (mask only), one accumulates Z_t and the LSSA output, and with re-weighting one more
  accumulates the online softmax of the sharpening logits. Autodiff differentiates the loops;
  `jax.checkpoint` on the query-block function and on every key-block step makes it keep only
  per-block carries ([Cq, H]) and recompute each block's logits in the backward pass, so no
  [T, S] (or [T, C] per key block) residual is stored. Key blocks the mask rules out (causal,
  window, segment ids) are skipped by a `lax.cond` in the forward and backward passes.

  Args: as for `softplus_attention`; `block_size` is the query and key block length C (each
    capped at its sequence length); other lengths are padded internally.

  Returns:
    out [B, T, N, H] in q.dtype.
  """
  b, t, n, h = q.shape
  s, nk = k.shape[1], k.shape[2]
  g = n // nk
  block_q, block_kv = min(block_size, t), min(block_size, s)
  qg, kt, scale = _prepare(q, k, scale, length_scale)
  qg = common.pad_to_multiple(qg, 3, block_q)
  kt = common.pad_to_multiple(kt, 2, block_kv)
  vt = common.pad_to_multiple(v.transpose(0, 2, 1, 3), 2, block_kv)
  num_q, num_kv = qg.shape[3] // block_q, kt.shape[2] // block_kv
  # Leading block axes to scan over: q [nq, B, K, G, Cq, H], k and v [nkv, B, K, Ckv, H].
  q_blocks = jnp.moveaxis(qg.reshape(b, nk, g, num_q, block_q, h), 3, 0)
  k_blocks = jnp.moveaxis(kt.reshape(b, nk, num_kv, block_kv, h), 2, 0)
  v_blocks = jnp.moveaxis(vt.reshape(b, nk, num_kv, block_kv, h), 2, 0)
  kv_starts = jnp.arange(num_kv, dtype=jnp.int32) * block_kv
  mask_batch = mask.q_segment_ids.shape[0] if mask.has_segments else 1

  def query_block(q_blk, q_start):
    """out [B, K, G, Cq, H] f32 of one query block."""

    def visible_at(kv_start):
      return mask.block(q_start, block_q, kv_start, block_kv, q_length=t,
                        kv_length=s)[:, :, None]

    def skip_if_empty(kv_start, step, carry):
      nonempty = mask.block_may_be_nonempty(q_start, block_q, kv_start, block_kv, q_length=t,
                                            kv_length=s)
      return lax.cond(nonempty, step, lambda c: c, carry)

    def count_step(counts, kv_start):
      return counts + visible_at(kv_start).sum(axis=-1, dtype=jnp.int32), None

    counts, _ = lax.scan(count_step, jnp.zeros((mask_batch, 1, 1, block_q), jnp.int32),
                         kv_starts)
    counts = counts.astype(jnp.float32)
    factor = _row_factor(counts, scale, length_scale)

    def softplus_at(k_blk, kv_start):
      bias_blk = None if bias is None else bias.block(q_start, block_q, kv_start, block_kv)
      return _softplus_block(q_blk, k_blk, factor, visible_at(kv_start), bias_blk)

    def normalise_step(carry, xs):
      k_blk, v_blk, kv_start = xs

      def step(carry):
        z, acc = carry
        sp = softplus_at(k_blk, kv_start)
        pv = jnp.einsum("bkgqs,bksh->bkgqh", sp.astype(v.dtype), v_blk,
                        preferred_element_type=jnp.float32)
        return z + sp.sum(axis=-1), acc + pv

      return skip_if_empty(kv_start, step, carry), None

    carry0 = (jnp.zeros((b, nk, g, block_q), jnp.float32),
              jnp.zeros((b, nk, g, block_q, h), jnp.float32))
    (z, acc), _ = lax.scan(jax.checkpoint(normalise_step, prevent_cse=False), carry0,
                           (k_blocks, v_blocks, kv_starts))
    z_safe = jnp.where(z > 0, z, 1.0)
    out = acc / z_safe[..., None]  # rows without keys: 0 / 1
    if not reweight_power:
      return out

    def sharpen_step(carry, xs):
      k_blk, v_blk, kv_start = xs

      def step(carry):
        # r is a softmax of y over the row's keys: the online softmax of the softmax paths. A
        # row with no positive entry yet keeps m = -inf and exp() at 0.
        y = _sharpening_logits(softplus_at(k_blk, kv_start), z_safe, counts,
                               visible_at(kv_start), reweight_power)
        return softmax.online_softmax_update(carry, y, v_blk)

      return skip_if_empty(kv_start, step, carry), None

    carry0 = softmax.online_softmax_init((b, nk, g, block_q), h)
    state, _ = lax.scan(jax.checkpoint(sharpen_step, prevent_cse=False), carry0,
                        (k_blocks, v_blocks, kv_starts))
    sharpened = state[1] > 0
    # Uniform rows (no weight above 1 / N) keep the LSSA output; see the module docstring.
    return jnp.where(sharpened[..., None], softmax.online_softmax_finish(state)[0], out)

  q_starts = jnp.arange(num_q, dtype=jnp.int32) * block_q
  out = lax.map(jax.checkpoint(lambda xs: query_block(*xs)), (q_blocks, q_starts))
  out = jnp.moveaxis(out, 0, 3).reshape(b, nk, g, num_q * block_q, h)[:, :, :, :t]
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)


def softplus_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: AttentionMask,
                       bias=None, scale: float | None = None, length_scale: bool = False,
                       reweight_power: float = 0.0, impl: str = "auto",
                       block_size: int | None = None) -> jax.Array:
  """Softplus attention with l1 normalisation (LSSA) and optional re-weighting (LSSAR).

  See the module docstring for the formulas.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys, N % K == 0; query head n uses kv head n // (N // K).
    v: [B, S, K, H] values.
    mask: `AttentionMask` (causal / window / global tokens / q_offset / segment ids); it also
      defines N_t, the number of keys query t sees.
    bias: None or a block bias (`longjax.ops.biases`), added to the (scaled) logits inside the
      softplus; its floating-point arrays get gradients.
    scale: Python float multiplying the logits; None: H ** -0.5, or log(H) with `length_scale`.
    length_scale: the paper's LSSA logits: q and k l2-normalised over H and each row's logits
      multiplied by log(N_t) (and by `scale`).
    reweight_power: p of the re-weighting; 0 turns it off, else it must be >= 1.
    impl: "auto", "reference" or "blockwise" (`SOFTPLUS_ATTENTION`; "auto" takes the dense
      reference where softmax attention would, else blockwise).
    block_size: block length C of the blockwise implementation (None: the default).

  Returns:
    out [B, T, N, H] in q.dtype; rows with no visible key give zeros.
  """
  check_qkv(q, k, v, mask)
  h = q.shape[3]
  if not reweight_power == 0 and not reweight_power >= 1:
    raise ValueError(f"reweight_power must be 0 (off) or >= 1, got {reweight_power!r}")
  if length_scale and h < 2:
    raise ValueError("length_scale needs a head dim H >= 2 (its scale is log(H))")
  block_size = default_block_size() if block_size is None else int(block_size)
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}")
  kwargs = dict(mask=mask, bias=bias, scale=scale, length_scale=length_scale,
                reweight_power=float(reweight_power))
  call = AttentionCall(q, k, mask, bias, block_size)
  resolved = dispatch.resolve(SOFTPLUS_ATTENTION, impl, call).impl
  if resolved == "reference":
    return softplus_attention_reference(q, k, v, **kwargs)
  return softplus_attention_blockwise(q, k, v, block_size=block_size, **kwargs)


# No kernel computes softplus rows: the XLA ops, chosen by softmax attention's dense rule.
SOFTPLUS_ATTENTION = dispatch.Op(
    name="softplus attention",
    implementations=(dispatch.Implementation("reference", passed_over=dense_passed_over),
                     dispatch.Implementation("blockwise")),
    preference={"cpu": ("reference", "blockwise")})
