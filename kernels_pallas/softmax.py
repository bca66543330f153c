"""The softmax numerics every attention path shares: written once, here.

* `merge_partials`: attention over disjoint key sets, each normalised over its own keys and
  given with its log-sum-exp, combined into attention over their union (split-KV decoding, the
  far and near parts of LM-Infinite, a learned sink, ring attention). `merge_attention` is the
  same merge for parts laid out as `dot_product_attention` returns them.
* `grouped_logits`, `masked_softmax_attention`: the two halves of every dense reference,
  q, k -> logits [B, N, T, S] and masked logits, v -> (out, lse).
* `logsumexp`, `softmax`: over the last axis of logits already masked with -inf (the grouped
  softmax of landmark attention builds its rows from both).
* `online_softmax_init` / `online_softmax_update` / `online_softmax_finish`: the running
  (max, normaliser, accumulator) of the XLA blockwise paths, one key block at a time
  (FlashAttention-2), in their [B, K, G, Cq, ...] layout. The Pallas kernels keep their own
  tile-shaped copy inside the kernel bodies (`flash_tiles.forward_tile`).

All of them follow one convention for rows that see no key: lse = -inf and an output of 0,
never NaN, with finite gradients. The shift that keeps exp() finite is the row maximum, taken
under `stop_gradient` (softmax does not depend on it) and replaced by 0 where it is -inf.

Imports jax only, like the rest of this package, so `longjax` imports it and never the reverse.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _shift(m: jax.Array) -> jax.Array:
  """The stabilising shift: m, without gradient, 0 where m is not finite (no key seen)."""
  m = jax.lax.stop_gradient(m)
  return jnp.where(jnp.isfinite(m), m, 0.0)


def logsumexp(x: jax.Array, axis: int = -1) -> jax.Array:
  """log sum exp(x) over `axis`; -inf, with zero gradients rather than NaN, where every entry
  is -inf (a row that sees nothing)."""
  m = _shift(jnp.max(x, axis=axis, keepdims=True))
  total = jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True)
  lse = m + jnp.log(jnp.where(total > 0, total, 1.0))
  return jnp.squeeze(jnp.where(total > 0, lse, -jnp.inf), axis)


def softmax(x: jax.Array) -> jax.Array:
  """Softmax over the last axis of logits masked with -inf; rows that see nothing give 0.

  exp(x - lse) with the gradient through lse (it is the normaliser, not a shift)."""
  lse = logsumexp(x)[..., None]
  return jnp.exp(x - jnp.where(jnp.isfinite(lse), lse, 0.0))


def merge_partials(out: jax.Array, lse: jax.Array, axis: int = 0
                   ) -> tuple[jax.Array, jax.Array]:
  """Combines attention over disjoint key sets by their log-sum-exps.

  With w_p = exp(lse_p - m) for the largest lse m, the union's output is
  sum_p w_p out_p / sum_p w_p and its lse is m + log(sum_p w_p).

  Args:
    out: [..., P, ..., H] partial outputs, any float dtype, each normalised over its own keys
      (0 where a part saw no key); the P parts sit at `axis`.
    lse: out's shape without H, any float dtype: the log-sum-exp of each part's logits (-inf
      where it saw none).
    axis: the partition axis (of both; non-negative).

  Returns:
    (out, lse) over the union of the keys, float32, without the partition axis; rows that no
    part saw give 0 and -inf (no NaN, also in the gradients).
  """
  out, lse = out.astype(jnp.float32), lse.astype(jnp.float32)
  m = _shift(lse.max(axis=axis, keepdims=True))
  w = jnp.exp(lse - m)  # 0 for empty parts, also when every part is empty (m = 0)
  total = w.sum(axis=axis)
  seen = total > 0
  total = jnp.where(seen, total, 1.0)  # keeps 0/0 and log(0) (and their gradients) out
  merged = (out * w[..., None]).sum(axis=axis) / total[..., None]
  return merged, jnp.where(seen, jnp.squeeze(m, axis) + jnp.log(total), -jnp.inf)


def merge_attention(parts: Sequence[tuple[jax.Array, jax.Array]]
                    ) -> tuple[jax.Array, jax.Array]:
  """`merge_partials` of parts in `dot_product_attention`'s layout.

  Args:
    parts: (out [B, T, N, H], lse [B, N, T]) per disjoint key set, as `merge_partials`.

  Returns:
    (out [B, T, N, H] float32, lse [B, N, T] float32) over the union of the keys.
  """
  outs = jnp.stack([jnp.asarray(o, jnp.float32) for o, _ in parts])
  lses = jnp.stack([jnp.asarray(lse, jnp.float32).transpose(0, 2, 1) for _, lse in parts])
  out, lse = merge_partials(outs, lses, axis=0)
  return out, lse.transpose(0, 2, 1)


def grouped_logits(q: jax.Array, k: jax.Array) -> jax.Array:
  """q.k of every query head with its kv head: f32 [B, N, T, S] (unscaled), dense.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys, N % K == 0; head n = kv head * (N // K) + group reads kv head
      n // (N // K), without repeating K.
  """
  b, t, n, h = q.shape
  s, nk = k.shape[1], k.shape[2]
  logits = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, nk, n // nk, h), k,
                      preferred_element_type=jnp.float32)
  return logits.reshape(b, n, t, s)


def masked_softmax_attention(logits: jax.Array, visible: jax.Array, v: jax.Array
                             ) -> tuple[jax.Array, jax.Array]:
  """softmax(logits where visible) v with grouped K/V heads: the dense reference's tail.

  Probabilities are rounded to v's dtype before the p v matmul, which accumulates in float32
  (as the kernels do).

  Args:
    logits: f32 [B, N, T, S] scaled (and biased) logits; head n reads kv head n // (N // K).
    visible: bool, broadcastable to logits: which keys each row sees.
    v: [B, S, K, H] values, N % K == 0.

  Returns:
    (out [B, T, N, H] float32, lse [B, N, T] float32); rows that see no key give 0 and -inf.
  """
  b, n, t, s = logits.shape
  nk, h = v.shape[2], v.shape[3]
  logits = jnp.where(visible, logits, -jnp.inf)
  m = _shift(logits.max(axis=-1, keepdims=True))
  e = jnp.exp(logits - m)
  total = e.sum(axis=-1, keepdims=True)
  seen = total > 0
  total = jnp.where(seen, total, 1.0)  # keeps 0/0 and log(0) (and their gradients) out
  p = (e / total).astype(v.dtype).reshape(b, nk, n // nk, t, s)
  out = jnp.einsum("bkgts,bskh->btkgh", p, v, preferred_element_type=jnp.float32)
  lse = jnp.where(seen, m + jnp.log(total), -jnp.inf)[..., 0]
  return out.reshape(b, t, n, h), lse


def online_softmax_init(rows: tuple[int, ...], head_dim: int
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The state before any key block: (m = -inf, l = 0 [*rows], acc = 0 [*rows, H]), f32."""
  return (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
          jnp.zeros((*rows, head_dim), jnp.float32))


def online_softmax_update(state: tuple[jax.Array, jax.Array, jax.Array], s: jax.Array,
                          v_blk: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Folds one key block into the running softmax state (FlashAttention-2's forward step).

  Args:
    state: (m, l [B, K, G, Cq], acc [B, K, G, Cq, H]) f32: the running maximum, normaliser
      sum exp(s - m) and unnormalised output sum exp(s - m) v.
    s: f32 [B, K, G, Cq, Ckv] logits of the block, -inf where hidden.
    v_blk: [B, K, Ckv, H] values of the block; exp(s - m) is rounded to its dtype for the
      matmul, which accumulates in float32.

  Returns:
    The new state. A row that has seen no visible key keeps m = -inf and l = acc = 0.
  """
  m, l, acc = state
  m_new = jax.lax.stop_gradient(jnp.maximum(m, s.max(axis=-1)))
  m_safe = _shift(m_new)  # exp(-inf - 0) = 0 rather than exp(-inf - -inf) = NaN
  p = jnp.exp(s - m_safe[..., None])
  alpha = jnp.exp(m - m_safe)
  pv = jnp.einsum("bkgqs,bksh->bkgqh", p.astype(v_blk.dtype), v_blk,
                  preferred_element_type=jnp.float32)
  return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * acc + pv


def online_softmax_finish(state: tuple[jax.Array, jax.Array, jax.Array]
                          ) -> tuple[jax.Array, jax.Array]:
  """(out = acc / l [..., H], lse = m + log(l) [...]) f32; 0 and -inf where l = 0."""
  m, l, acc = state
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  return acc / l_safe[..., None], jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)
