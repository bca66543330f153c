"""The maths of one flash attention tile, shared by the TPU and GPU kernel variants.

Each function takes arrays already loaded from refs (one query block and one key block of one
head) and returns f32 values; the variants only differ in how they load blocks, loop over them
and keep the running statistics (Mosaic grid axes with scratch memory vs Triton loops). Only
two matmul forms are used, q k^T ("NT") and p v ("NN"), which both Mosaic and Triton lower.

Row statistics are columns [rows, 1] here; the TPU variant keeps them lane-replicated in
scratch as [rows, 128] and passes the first column.
"""

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas.block_mask import FlashSpec
from kernels_pallas.block_mask import tile_visibility

# Initial running max: finite, so that a row whose keys are all masked (-inf) keeps
# exp(-inf - MASK) = 0 and exp(MASK - MASK) = 1 instead of producing NaN from inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)

_NT = (((1,), (1,)), ((), ()))  # a [m, h] x b [n, h] -> [m, n]
_NN = (((1,), (0,)), ((), ()))  # a [m, n] x b [n, h] -> [m, h]


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b.T with float32 accumulation (inputs stay in their dtype, e.g. bf16 on the MXU)."""
  return lax.dot_general(a, b, _NT, preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b with float32 accumulation."""
  return lax.dot_general(a, b, _NN, preferred_element_type=jnp.float32)


def tile_logits(spec: FlashSpec, qk: jax.Array, distance: jax.Array, slope):
  """Scaled, soft-capped, biased logits of a tile from raw q.k (float32), before masking.

  Returns:
    (logits, capped): `capped` is tanh(scale * qk / cap), which the backward pass needs, or None.
  """
  x = qk * spec.scale if spec.scale != 1.0 else qk
  capped = None
  if spec.soft_cap is not None:
    capped = jnp.tanh(x * (1.0 / spec.soft_cap))
    x = capped * spec.soft_cap
  if spec.has_alibi:
    x = x - slope * jnp.abs(distance).astype(jnp.float32)
  return x, capped


def logits_grad(spec: FlashSpec, ds: jax.Array, capped) -> jax.Array:
  """Pulls d(logits) of a tile back to d(q.k), through the soft cap and the scale."""
  if capped is not None:
    ds = ds * (1.0 - capped * capped)
  return ds * spec.scale if spec.scale != 1.0 else ds


def masked_logits(spec: FlashSpec, qk: jax.Array, *, q_start, kv_start, q_offset, slope,
                  segment_visible, transposed: bool = False):
  """Logits of a tile with hidden entries at -inf.

  Args:
    spec: the static spec.
    qk: [bq, bk] raw q.k, or [bk, bq] when `transposed`.
    q_start: first query row of the tile.
    kv_start: first key of the tile.
    q_offset: absolute index of query row 0.
    slope: the head's ALiBi slope (f32 scalar) or None.
    segment_visible: bool array broadcastable to qk (equal segment ids), or None.
    transposed: the tile is keys x queries.

  Returns:
    (logits, capped, distance): as for `tile_logits`, hidden entries of logits at -inf, and the
    int32 distances i - j of the tile.
  """
  visible, distance = tile_visibility(spec, q_start, kv_start, q_offset, qk.shape,
                                      transposed=transposed)
  if segment_visible is not None:
    visible = visible & segment_visible
  x, capped = tile_logits(spec, qk, distance, slope)
  return jnp.where(visible, x, -jnp.inf), capped, distance


def forward_tile(spec: FlashSpec, q, k, v, m_prev, l_prev, acc_prev, **where):
  """One online-softmax step (FlashAttention-2): folds a key block into the running state.

  Args:
    spec: the static spec.
    q: [bq, H] query block.
    k: [bk, H] key block.
    v: [bk, H] value block.
    m_prev: [bq, 1] f32 running max (starts at MASK_VALUE).
    l_prev: [bq, 1] f32 running sum of exp(logits - m) (starts at 0).
    acc_prev: [bq, H] f32 running unnormalised output (starts at 0).
    **where: q_start, kv_start, q_offset, slope, segment_visible (see `masked_logits`).

  Returns:
    (m, l, acc), the updated state.
  """
  x, _, _ = masked_logits(spec, dot_nt(q, k), **where)
  m_next = jnp.maximum(m_prev, x.max(axis=1, keepdims=True))
  p = jnp.exp(x - m_next)
  alpha = jnp.exp(m_prev - m_next)
  l_next = alpha * l_prev + p.sum(axis=1, keepdims=True)
  acc = alpha * acc_prev + dot_nn(p.astype(v.dtype), v)
  return m_next, l_next, acc


def forward_finish(m, l, acc):
  """Output [bq, H] f32 and lse [bq, 1] f32 from the final state; rows that saw nothing give 0
  and -inf."""
  seen = l > 0
  safe_l = jnp.where(seen, l, 1.0)
  return acc / safe_l, jnp.where(seen, m + jnp.log(safe_l), -jnp.inf)


def dq_tile(spec: FlashSpec, q, k, v, do, lse, delta, **where):
  """A key block's contribution to dq (FlashAttention-2 backward).

  Args:
    spec: the static spec.
    q: [bq, H]; k, v: [bk, H]; do: [bq, H] output cotangent.
    lse: [bq, 1] f32 forward log-sum-exp, with -inf replaced by any finite value.
    delta: [bq, 1] f32 rowsum(dO * O).
    **where: as for `forward_tile`.

  Returns:
    (dq, dslope): dq [bq, H] f32; with ALiBi, dslope [bq, 1] f32, each row's contribution to the
    gradient of its head's slope (else None).
  """
  x, capped, distance = masked_logits(spec, dot_nt(q, k), **where)
  p = jnp.exp(x - lse)
  dlogits = p * (dot_nt(do, v) - delta)
  dq = dot_nn(logits_grad(spec, dlogits, capped).astype(k.dtype), k)
  if not spec.has_alibi:
    return dq, None
  # d(logits) / d(slope) = -|i - j|; hidden entries have p = 0 and add nothing.
  return dq, -(dlogits * jnp.abs(distance).astype(jnp.float32)).sum(axis=1, keepdims=True)


def dkv_tile(spec: FlashSpec, k, v, q, do, lse, delta, **where):
  """A query block's contribution to dk and dv, on transposed (keys x queries) tiles.

  Working on k q^T keeps the per-query statistics as rows [1, bq] and needs only NT/NN matmuls.

  Args:
    spec: the static spec.
    k, v: [bk, H]; q, do: [bq, H].
    lse: [1, bq] f32 (finite, as for `dq_tile`).
    delta: [1, bq] f32.
    **where: as for `forward_tile`, with segment_visible broadcastable to [bk, bq].

  Returns:
    (dk, dv), each [bk, H] f32.
  """
  x, capped, _ = masked_logits(spec, dot_nt(k, q), transposed=True, **where)
  p = jnp.exp(x - lse)
  dv = dot_nn(p.astype(do.dtype), do)
  ds = logits_grad(spec, p * (dot_nt(v, do) - delta), capped)
  dk = dot_nn(ds.astype(q.dtype), q)
  return dk, dv
