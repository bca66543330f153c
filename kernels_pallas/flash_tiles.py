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


def head_bias_params(spec: FlashSpec, params_ref, head) -> tuple:
  """One head's bias parameters as f32 scalars, from the head-major [N * P] parameter array."""
  num = spec.num_bias_params
  return tuple(params_ref[head * num + p] for p in range(num))


def tile_bias(spec: FlashSpec, d: jax.Array, params) -> jax.Array:
  """The bias of a tile from the distances d = |p_q - p_k| (float32); see `block_mask`.

  Args:
    spec: the static spec (spec.bias is not None).
    d: float32 distances, the tile's shape.
    params: the head's parameters (`head_bias_params`): (slope,) or (r1, r2), scalars or arrays
      broadcastable to d.
  """
  if spec.bias == "alibi":
    return -params[0] * d
  r1, r2 = params
  if spec.bias == "kerple_log":
    return -r1 * jnp.log1p(r2 * d)
  # d ** r2 as exp(r2 log d) with d = 0 apart (as `longjax.posenc.relative_bias.kerple_bias`):
  # 0 ** r2 differentiated by r2 would be 0 * log(0) = NaN.
  positive = d > 0
  return -r1 * jnp.where(positive, jnp.exp(r2 * jnp.log(jnp.where(positive, d, 1.0))), 0.0)


def tile_bias_grads(spec: FlashSpec, d: jax.Array, params) -> tuple:
  """d(bias) / d(parameter) of a tile, one array per parameter (arguments as for `tile_bias`)."""
  if spec.bias == "alibi":
    return (-d,)
  r1, r2 = params
  if spec.bias == "kerple_log":
    return -jnp.log1p(r2 * d), -r1 * d / (1.0 + r2 * d)
  positive = d > 0
  log_d = jnp.log(jnp.where(positive, d, 1.0))  # 0 where d = 0, so both derivatives are 0
  power = jnp.where(positive, jnp.exp(r2 * log_d), 0.0)
  return -power, -r1 * power * log_d


def tile_logits(spec: FlashSpec, qk: jax.Array, d, bias_params):
  """Scaled, soft-capped, biased logits of a tile from raw q.k (float32), before masking.

  Args:
    spec: the static spec.
    qk: raw q.k tile, float32.
    d: float32 bias distances |p_q - p_k| of the tile (unused without a bias).
    bias_params: the head's bias parameters (see `tile_bias`) or None.

  Returns:
    (logits, capped): `capped` is tanh(scale * qk / cap), which the backward pass needs, or None.
  """
  x = qk * spec.scale if spec.scale != 1.0 else qk
  capped = None
  if spec.soft_cap is not None:
    capped = jnp.tanh(x * (1.0 / spec.soft_cap))
    x = capped * spec.soft_cap
  if spec.bias is not None:
    x = x + tile_bias(spec, d, bias_params)
  return x, capped


def logits_grad(spec: FlashSpec, ds: jax.Array, capped) -> jax.Array:
  """Pulls d(logits) of a tile back to d(q.k), through the soft cap and the scale."""
  if capped is not None:
    ds = ds * (1.0 - capped * capped)
  return ds * spec.scale if spec.scale != 1.0 else ds


def masked_logits(spec: FlashSpec, qk: jax.Array, *, q_start, kv_start, q_offset, bias_params,
                  segment_visible, positions=None, transposed: bool = False):
  """Logits of a tile with hidden entries at -inf.

  Args:
    spec: the static spec.
    qk: [bq, bk] raw q.k, or [bk, bq] when `transposed`.
    q_start: first query row of the tile.
    kv_start: first key of the tile.
    q_offset: absolute index of query row 0.
    bias_params: the head's bias parameters (`head_bias_params`) or None.
    segment_visible: bool array broadcastable to qk (equal segment ids), or None.
    positions: (q_pos, kv_pos) int32 arrays whose difference broadcasts to qk ([bq, 1] and
      [1, bk], or [1, bq] and [bk, 1] when transposed): the bias's positions; None means the
      indices.
    transposed: the tile is keys x queries.

  Returns:
    (logits, capped, d): as for `tile_logits`, hidden entries of logits at -inf, and the f32
    bias distances |p_q - p_k| of the tile (None without a bias).
  """
  visible, distance = tile_visibility(spec, q_start, kv_start, q_offset, qk.shape,
                                      transposed=transposed)
  if segment_visible is not None:
    visible = visible & segment_visible
  d = None
  if spec.bias is not None:
    if positions is not None:
      distance = positions[0] - positions[1]  # int32: exact for any position
    d = jnp.abs(distance).astype(jnp.float32)
  x, capped = tile_logits(spec, qk, d, bias_params)
  return jnp.where(visible, x, -jnp.inf), capped, d


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
    **where: q_start, kv_start, q_offset, bias_params, segment_visible, positions (see
      `masked_logits`).

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
    (dq, dparams): dq [bq, H] f32; with a bias, dparams is a tuple of [bq, 1] f32, one per bias
    parameter: each row's contribution to the gradient of its head's parameter (else None).
  """
  x, capped, d = masked_logits(spec, dot_nt(q, k), **where)
  p = jnp.exp(x - lse)
  dlogits = p * (dot_nt(do, v) - delta)
  dq = dot_nn(logits_grad(spec, dlogits, capped).astype(k.dtype), k)
  if spec.bias is None:
    return dq, None
  # Hidden entries have p = 0 and add nothing (the derivatives are finite everywhere).
  return dq, tuple((dlogits * g).sum(axis=1, keepdims=True)
                   for g in tile_bias_grads(spec, d, where["bias_params"]))


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
