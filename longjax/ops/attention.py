"""Softmax dot-product attention: the one dispatch point and the dense reference.

`dot_product_attention` is what layers call; `impl` picks the implementation and "auto" is
resolved in `resolve_impl` only. Implementations share one set of semantics:
  * GQA: query head n uses kv head n // (N // K); K/V are never repeated in memory.
  * logits = scale * q.k (+ bias) in float32; softmax statistics in float32; matmuls run in the
    input dtype with float32 accumulation (`preferred_element_type`).
  * rows with no visible key output zeros and lse = -inf, with finite gradients.
  * lse is the natural log of the softmax normaliser of the scaled, biased logits.
  * mask and bias arrays get zero gradients (they carry no trainable parameters).
"""

import jax
import jax.numpy as jnp

from longjax.ops.attention_blockwise import blockwise_attention
from longjax.ops.masks import AttentionMask

IMPLS = ("auto", "reference", "blockwise")

# Measured on the 2-core CPU dev box (f32, N=8, H=64, fwd+bwd, see docs/ops notes in the change
# description): 512 was within noise of the best block size at T = S in {2048, 4096}; smaller
# blocks pay per-iteration loop overhead, larger ones spill out of cache.
DEFAULT_BLOCK_SIZE = 512

# Names that will become valid later, with the reason they cannot serve yet.
_NOT_YET = {
    "pallas": "the Pallas attention kernels are not implemented yet",
    "splash": "jax's splash attention is not wired in yet (it needs a TPU)",
}


def resolve_impl(impl: str, *, q_length: int, kv_length: int,
                 block_size: int | None = None) -> str:
  """Resolves `impl` to the implementation that will run; the only place "auto" is decided.

  Rule for "auto" (all backends for now; Pallas kernels will take over on GPU/TPU when they
  exist): "reference" when every key fits in one block (kv_length <= block size), otherwise
  "blockwise". With a single key block the blockwise op does the same arithmetic as the dense one
  plus loop and padding overhead and saves no memory; beyond it the dense op's [T, S] logits grow
  quadratically (fwd+bwd temp memory) while on the CPU it is no faster than blockwise at
  T = S >= 1024 (measured: see `DEFAULT_BLOCK_SIZE`). q_length does not enter the rule: decoding
  (T = 1) against a long cache is blockwise too, which streams the cache in blocks.

  Args:
    impl: "auto", "reference" or "blockwise".
    q_length: T.
    kv_length: S.
    block_size: the block size the call will use (None: `DEFAULT_BLOCK_SIZE`).

  Returns:
    "reference" or "blockwise".

  Raises:
    ValueError: for any other name, saying why it cannot serve.
  """
  del q_length  # see the rule above
  if impl in _NOT_YET:
    raise ValueError(f"impl={impl!r} is unavailable: {_NOT_YET[impl]}; valid choices: {IMPLS}")
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not an attention implementation; valid choices: {IMPLS}")
  if impl != "auto":
    return impl
  block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
  return "reference" if kv_length <= block_size else "blockwise"


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: AttentionMask,
                        bias=None, scale: float) -> tuple[jax.Array, jax.Array]:
  """Dense attention, the plain definition; materialises [B, N, T, S] logits.

  Args:
    q: [B, T, N, H].
    k: [B, S, K, H] with N % K == 0.
    v: [B, S, K, H].
    mask: the attention mask spec.
    bias: None or a block bias (evaluated as one block).
    scale: logit scale.

  Returns:
    out [B, T, N, H] in q.dtype and lse [B, N, T] float32.
  """
  b, t, n, h = q.shape
  s, nk = k.shape[1], k.shape[2]
  g = n // nk
  logits = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, nk, g, h), k,
                      preferred_element_type=jnp.float32)
  logits = logits.reshape(b, n, t, s) * scale  # head n = kv_head * G + group
  if bias is not None:
    logits = logits + bias.block(0, t, 0, s)
  logits = jnp.where(mask.dense(t, s), logits, -jnp.inf)
  # The shift only stabilises exp(); softmax does not depend on it, so no gradient through it.
  m = jax.lax.stop_gradient(logits.max(axis=-1, keepdims=True))
  m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows with no visible key: exp(-inf - 0) = 0
  e = jnp.exp(logits - m)
  total = e.sum(axis=-1, keepdims=True)
  seen = total > 0
  total = jnp.where(seen, total, 1.0)  # keeps 0/0 and log(0) (and their gradients) out
  p = e / total
  out = jnp.einsum("bkgts,bskh->btkgh", p.astype(v.dtype).reshape(b, nk, g, t, s), v,
                   preferred_element_type=jnp.float32)
  lse = jnp.where(seen, m + jnp.log(total), -jnp.inf)[..., 0]
  return out.reshape(b, t, n, h).astype(q.dtype), lse


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: AttentionMask,
                          bias=None, scale: float | None = None, impl: str = "auto",
                          block_size: int | None = None, return_lse: bool = False):
  """Softmax attention softmax(scale * q k^T + bias, masked) v with grouped K/V heads.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys, N % K == 0; query head n uses kv head n // (N // K).
    v: [B, S, K, H] values.
    mask: `AttentionMask` (causal / window / q_offset / segment ids).
    bias: None or a block bias such as `AlibiBias`; its arrays are constants (zero gradient).
    scale: Python float multiplying q.k; None means H ** -0.5.
    impl: "auto", "reference" or "blockwise"; see `resolve_impl`.
    block_size: block length C of the blockwise op (None: `DEFAULT_BLOCK_SIZE`).
    return_lse: also return the log-sum-exp of each row's scaled logits.

  Returns:
    out [B, T, N, H] in q.dtype; with `return_lse`, (out, lse) where lse is [B, N, T] float32.
    Rows with no visible key give zeros (and lse = -inf).
  """
  b, t, n, h = q.shape
  if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"k and v must be [B={b}, S, K, H={h}], got {k.shape} and {v.shape}")
  if n % k.shape[2]:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={k.shape[2]}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  s = k.shape[1]
  mask.validate(b, t, s)
  scale = h ** -0.5 if scale is None else float(scale)
  block_size = DEFAULT_BLOCK_SIZE if block_size is None else int(block_size)
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}")
  bias = jax.tree.map(jax.lax.stop_gradient, bias)
  resolved = resolve_impl(impl, q_length=t, kv_length=s, block_size=block_size)
  if resolved == "reference":
    out, lse = attention_reference(q, k, v, mask=mask, bias=bias, scale=scale)
  else:
    out, lse = blockwise_attention(q, k, v, mask=mask, bias=bias, scale=scale,
                                   block_size=block_size)
  return (out, lse) if return_lse else out
