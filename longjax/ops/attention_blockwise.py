"""Blockwise (flash-style) softmax attention in plain XLA, with O(T·C) memory forward and backward.

Forward: for each query block, an online softmax over the key blocks it can see (running max,
normaliser and output accumulator in float32). Only (q, k, v, out, lse) and the mask/bias arrays
are saved; the backward pass recomputes the probabilities block by block (flash-attention-2:
D = rowsum(dO * O); dv, dk accumulated per key block, dq accumulated into one [T, H] buffer), so
no [T, S] array exists in either direction.

Blocks the mask rules out are not visited: loops over key (query) blocks run between bounds the
mask derives from its index rules (causal, window, lengths), and with segment ids a `lax.cond`
skips blocks whose id ranges do not overlap. The loops have traced bounds, which reverse-mode
autodiff cannot see through; that is fine because the custom VJP below never differentiates them.

Layouts inside this module put heads before length so that each block is a batched matmul over
(batch, kv head) with the G = N // K query heads of a group sharing one K/V block (GQA without
repeating K/V): q, out [B, K, G, T, H]; k, v [B, K, S, H]; lse, D [B, K, G, T].
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import common
from longjax.ops.masks import AttentionMask


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static parameters of one call (hashable: it is a `nondiff_argnums` of the custom VJP)."""

  scale: float
  block_q: int
  block_kv: int
  q_length: int  # real lengths before padding
  kv_length: int


def _groups(x: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B|1, N|1, q, s] -> [B|1, K|1, G|1, q, s], splitting query heads into (kv head, group)."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], num_kv_heads, x.shape[1] // num_kv_heads, *x.shape[2:])


def _block_logits(cfg, q_blk, k_blk, mask, bias, q_start, kv_start):
  """Scaled, biased, masked logits of one block: f32 [B, K, G, Cq, Ckv] (-inf where hidden)."""
  s = jnp.einsum("bkgqh,bksh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
  s = s * cfg.scale
  if bias is not None:
    s = s + _groups(bias.block(q_start, cfg.block_q, kv_start, cfg.block_kv), k_blk.shape[1])
  visible = mask.block(q_start, cfg.block_q, kv_start, cfg.block_kv,
                       q_length=cfg.q_length, kv_length=cfg.kv_length)
  return jnp.where(visible[:, :, None], s, -jnp.inf)


def _block_range(lo, hi, block: int):
  """Indices of the blocks of size `block` that intersect [lo, hi) (none when hi <= lo)."""
  first = lo // block
  last = jnp.where(hi > lo, common.cdiv(hi, block), first)
  return first, last


def _skip_if_empty(mask, cfg, q_start, kv_start, step, carry):
  """Runs `step(carry)` unless the mask rules the block out by content (segment ids).

  Index rules are already handled by loop bounds, so the cond is only worth its overhead when
  the mask has segment ids.
  """
  if not mask.has_segments:
    return step(carry)
  nonempty = mask.block_may_be_nonempty(q_start, cfg.block_q, kv_start, cfg.block_kv,
                                        q_length=cfg.q_length, kv_length=cfg.kv_length)
  return lax.cond(nonempty, step, lambda c: c, carry)


def _forward(cfg: _Config, q, k, v, mask, bias):
  """Returns out [B, K, G, Tp, H] in q.dtype and lse [B, K, G, Tp] f32 (padded lengths)."""
  b, nk, g, tp, h = q.shape
  out0 = jnp.zeros(q.shape, q.dtype)
  lse0 = jnp.full((b, nk, g, tp), -jnp.inf, jnp.float32)

  def q_step(i, carry):
    out, lse = carry
    q_start = i * cfg.block_q
    q_blk = lax.dynamic_slice_in_dim(q, q_start, cfg.block_q, axis=3)

    def kv_step(j, state):
      kv_start = j * cfg.block_kv

      def compute(state):
        m, l, acc = state
        k_blk = lax.dynamic_slice_in_dim(k, kv_start, cfg.block_kv, axis=2)
        v_blk = lax.dynamic_slice_in_dim(v, kv_start, cfg.block_kv, axis=2)
        s = _block_logits(cfg, q_blk, k_blk, mask, bias, q_start, kv_start)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # A row that has seen no visible key keeps m = -inf; shifting by 0 instead keeps
        # exp() at exactly 0 for it rather than exp(-inf - -inf) = NaN.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(m - m_safe)
        l = alpha * l + p.sum(axis=-1)
        pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v.dtype), v_blk,
                        preferred_element_type=jnp.float32)
        return m_new, l, alpha[..., None] * acc + pv

      return _skip_if_empty(mask, cfg, q_start, kv_start, compute, state)

    lo, hi = mask.kv_index_range(q_start, cfg.block_q, q_length=cfg.q_length,
                                 kv_length=cfg.kv_length)
    first, last = _block_range(lo, hi, cfg.block_kv)
    state0 = (jnp.full((b, nk, g, cfg.block_q), -jnp.inf, jnp.float32),
              jnp.zeros((b, nk, g, cfg.block_q), jnp.float32),
              jnp.zeros((b, nk, g, cfg.block_q, h), jnp.float32))
    m, l, acc = lax.fori_loop(first, last, kv_step, state0)
    seen = l > 0  # rows with no visible key output zeros and lse = -inf
    l_safe = jnp.where(seen, l, 1.0)
    out_blk = (acc / l_safe[..., None]).astype(out.dtype)
    lse_blk = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
    out = lax.dynamic_update_slice_in_dim(out, out_blk, q_start, axis=3)
    lse = lax.dynamic_update_slice_in_dim(lse, lse_blk, q_start, axis=3)
    return out, lse

  return lax.fori_loop(0, tp // cfg.block_q, q_step, (out0, lse0))


def _backward(cfg: _Config, q, k, v, out, lse, mask, bias, d_out, d_lse):
  """Flash-attention-2 backward; returns (dq, dk, dv) in the dtypes of (q, k, v)."""
  sp = k.shape[2]
  # d lse_i / d s_ij = p_ij, so an lse cotangent enters exactly like -D.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - d_lse
  # Rows without visible keys have lse = -inf; all their logits are -inf too, so shifting by 0
  # gives p = 0 instead of NaN.
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def kv_step(j, carry):
    dq, dk, dv = carry
    kv_start = j * cfg.block_kv
    k_blk = lax.dynamic_slice_in_dim(k, kv_start, cfg.block_kv, axis=2)
    v_blk = lax.dynamic_slice_in_dim(v, kv_start, cfg.block_kv, axis=2)

    def q_step(i, state):
      q_start = i * cfg.block_q

      def compute(state):
        dq, dk_blk, dv_blk = state
        sl = functools.partial(lax.dynamic_slice_in_dim, start_index=q_start,
                               slice_size=cfg.block_q, axis=3)
        q_blk, do_blk, lse_blk, delta_blk = sl(q), sl(d_out), sl(lse), sl(delta)
        s = _block_logits(cfg, q_blk, k_blk, mask, bias, q_start, kv_start)
        p = jnp.exp(s - lse_blk[..., None])
        dv_blk += jnp.einsum("bkgqs,bkgqh->bksh", p.astype(d_out.dtype), do_blk,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgqh,bksh->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
        ds = p * (dp - delta_blk[..., None])  # d loss / d logits (before the scale)
        dk_blk += jnp.einsum("bkgqs,bkgqh->bksh", ds.astype(q.dtype), q_blk,
                             preferred_element_type=jnp.float32)
        dq_blk = jnp.einsum("bkgqs,bksh->bkgqh", ds.astype(k.dtype), k_blk,
                            preferred_element_type=jnp.float32)
        dq = lax.dynamic_update_slice_in_dim(dq, sl(dq) + dq_blk, q_start, axis=3)
        return dq, dk_blk, dv_blk

      return _skip_if_empty(mask, cfg, q_start, kv_start, compute, state)

    lo, hi = mask.q_index_range(kv_start, cfg.block_kv, q_length=cfg.q_length,
                                kv_length=cfg.kv_length)
    first, last = _block_range(lo, hi, cfg.block_q)
    blk_shape = (*k_blk.shape[:2], cfg.block_kv, k_blk.shape[3])
    state0 = (dq, jnp.zeros(blk_shape, jnp.float32), jnp.zeros(blk_shape, jnp.float32))
    dq, dk_blk, dv_blk = lax.fori_loop(first, last, q_step, state0)
    # The scale is applied once per block here rather than to every ds.
    dk = lax.dynamic_update_slice_in_dim(dk, (dk_blk * cfg.scale).astype(dk.dtype), kv_start,
                                         axis=2)
    dv = lax.dynamic_update_slice_in_dim(dv, dv_blk.astype(dv.dtype), kv_start, axis=2)
    return dq, dk, dv

  carry0 = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, k.dtype),
            jnp.zeros(v.shape, v.dtype))
  dq, dk, dv = lax.fori_loop(0, sp // cfg.block_kv, kv_step, carry0)
  return (dq * cfg.scale).astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, mask, bias):
  return _forward(cfg, q, k, v, mask, bias)


def _attention_fwd(cfg, q, k, v, mask, bias):
  out, lse = _forward(cfg, q, k, v, mask, bias)
  return (out, lse), (q, k, v, out, lse, mask, bias)


def _attention_bwd(cfg, residuals, cotangents):
  q, k, v, out, lse, mask, bias = residuals
  d_out, d_lse = cotangents
  dq, dk, dv = _backward(cfg, q, k, v, out, lse, mask, bias, d_out, d_lse)
  # Masks and biases carry no trainable parameters: None is a zero cotangent for their arrays.
  return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: AttentionMask,
                        bias=None, scale: float, block_size: int) -> tuple[jax.Array, jax.Array]:
  """Blockwise attention; call it through `longjax.ops.dot_product_attention`.

  Args:
    q: [B, T, N, H].
    k: [B, S, K, H] with N % K == 0.
    v: [B, S, K, H].
    mask: the attention mask spec.
    bias: None or a block bias (see `longjax.ops.biases`); its arrays get no gradient.
    scale: Python float multiplying the logits.
    block_size: block length C for queries and keys (each capped at its sequence length);
      lengths that are not multiples of it are padded internally.

  Returns:
    out [B, T, N, H] in q.dtype and lse [B, N, T] float32.
  """
  b, t, n, h = q.shape
  s, nk = k.shape[1], k.shape[2]
  g = n // nk
  cfg = _Config(scale=float(scale), block_q=min(block_size, t), block_kv=min(block_size, s),
                q_length=t, kv_length=s)
  # [B, T, N, H] -> [B, K, G, T, H] and [B, S, K, H] -> [B, K, S, H]: one O(T) copy each, so
  # that every block matmul is batched over (B, K) with contiguous rows.
  qt = common.pad_to_multiple(q.reshape(b, t, nk, g, h).transpose(0, 2, 3, 1, 4), 3, cfg.block_q)
  kt = common.pad_to_multiple(k.transpose(0, 2, 1, 3), 2, cfg.block_kv)
  vt = common.pad_to_multiple(v.transpose(0, 2, 1, 3), 2, cfg.block_kv)
  out, lse = _attention(cfg, qt, kt, vt, mask, bias)
  out = out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return out, lse[:, :, :, :t].reshape(b, n, t)
