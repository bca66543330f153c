"""The maths of one chunk of causal linear attention, shared by the TPU and GPU kernel variants.

Within a chunk of C steps, b is the inclusive cumulative sum of the per-step log decay from the
chunk's first step (so b_t - b_s = sum of log decays over s+1..t) and b_last = b_{C-1} is the
whole chunk's log decay. For a state S [Dk, Dv] entering the chunk (Lightning Attention-2):

  o_t   = scale * (sum_{s<=t} exp(b_t - b_s) (q_t . k_s) v_s + exp(b_t) q_t S)
  S_out = exp(b_last) S + sum_s exp(b_last - b_s) k_s^T v_s

Each function takes tiles already loaded from refs and returns f32 values; the variants differ
only in how they load chunks and carry the state (Mosaic grid axis + scratch vs a Triton loop).
The decay views come in as a column b_col [C, 1], a row b_row [1, C] and b_last (broadcastable
to [1, 1]), which each variant builds in the way its compiler handles best.

With a decay per key channel (GLA), b is a [C, Dk] tile and exp(b_t - b_s) differs per channel:
no single matmul computes the within-chunk scores. They are formed exactly as a masked
[C, C, Dk] product summed over channels (every exponent <= 0, so no channel that decays fast
can overflow, where the factorised (q e^b) (k e^-b)^T would), which is why per-channel chunks
are small (16, GLA's sub-chunk); everything that crosses a chunk edge stays a matmul.

Matmuls are NT (a @ b.T), NN (a @ b) and NN with an explicitly transposed lhs, which both Mosaic
and Triton lower. Products of two input tiles (q k^T, dO v^T) stay in the input dtype (bf16
products are exact in f32, so nothing is lost); everything that touches a decay or the state is
f32, at full f32 precision (Triton would otherwise use TF32 and Mosaic bf16 passes).
"""

import dataclasses

import jax.numpy as jnp
from jax import lax

_NT = (((1,), (1,)), ((), ()))  # a [m, h] x b [n, h] -> [m, n]
_NN = (((1,), (0,)), ((), ()))  # a [m, n] x b [n, h] -> [m, h]


@dataclasses.dataclass(frozen=True)
class LinearSpec:
  """Static description of a chunked linear attention call (hashable: a custom_vjp static arg).

  Attributes:
    chunk: C, steps per chunk.
    scale: multiplies q.
    has_decay: whether a log decay is given; without it every decay is 1 and the kernels skip
      the exponentials (and the gradient of the decay).
    groups: query heads per key/value head (N // K).
    per_channel: the decay is per key channel (GLA: S_t = diag(a_t) S_{t-1} + k_t^T v_t), and
      the chunk functions below take `channel_views` instead of the scalar views.
  """
  chunk: int
  scale: float
  has_decay: bool
  groups: int
  per_channel: bool = False


def _dot(a, b, dims):
  if a.dtype != b.dtype:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def dot_nt(a, b):
  """a @ b.T, f32 accumulation."""
  return _dot(a, b, _NT)


def dot_nn(a, b):
  """a @ b, f32 accumulation."""
  return _dot(a, b, _NN)


def dot_tn(a, b):
  """a.T @ b (contracting the chunk axis: k^T v, q^T dO), through an explicit 2-D transpose."""
  return _dot(a.astype(jnp.float32).T, b, _NN)


def intra_mask(spec: LinearSpec, b_col, b_row, *, transposed: bool = False):
  """Causal decay mask of a chunk: M[t, s] = exp(b_t - b_s) for s <= t, else 0.

  Args:
    spec: the static spec.
    b_col: [C, 1] f32 within-chunk cumulative log decay as a column.
    b_row: [1, C] f32 the same as a row.
    transposed: return M^T (rows are keys s, columns queries t), for the dk/dv tiles.

  Returns:
    [C, C] f32.
  """
  c = spec.chunk
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  causal = rows <= cols if transposed else rows >= cols
  if not spec.has_decay:
    return causal.astype(jnp.float32)
  # Mask before the exponential: above the diagonal b_t - b_s is minus a sum of log decays and
  # can overflow to inf for strong data-dependent decay (inf * 0 = NaN in every gradient).
  diff = b_row - b_col if transposed else b_col - b_row
  return jnp.exp(jnp.where(causal, diff, -jnp.inf))


def next_state(spec: LinearSpec, k, v, state, b_col, b_last):
  """S_out = exp(b_last) S + sum_s exp(b_last - b_s) k_s^T v_s: [Dk, Dv] f32."""
  k = k.astype(jnp.float32)
  if not spec.has_decay:
    return state + dot_tn(k, v)
  return jnp.exp(b_last) * state + dot_tn(k * jnp.exp(b_last - b_col), v)


def forward_chunk(spec: LinearSpec, q, k, v, state, b_col, b_row, b_last):
  """One chunk of the forward pass.

  Args:
    spec: the static spec.
    q: [C, Dk]; k: [C, Dk]; v: [C, Dv] (any float dtype).
    state: [Dk, Dv] f32 state entering the chunk.
    b_col, b_row, b_last: the chunk's cumulative log decay views (module docstring).

  Returns:
    (out [C, Dv] f32, state leaving the chunk [Dk, Dv] f32).
  """
  scores = dot_nt(q, k) * intra_mask(spec, b_col, b_row)
  inter = dot_nn(q, state)
  if spec.has_decay:
    inter = inter * jnp.exp(b_col)
  out = (dot_nn(scores, v) + inter) * spec.scale
  return out, next_state(spec, k, v, state, b_col, b_last)


def dq_chunk(spec: LinearSpec, k, v, do, state, b_col, b_row):
  """dq of one chunk, given the state entering it (the dq pass runs forwards in time).

  dq_t = scale * (sum_{s<=t} exp(b_t - b_s) (dO_t . v_s) k_s + exp(b_t) dO_t S^T).

  Returns:
    [C, Dk] f32 (the caller advances the state with `next_state`).
  """
  dp = dot_nt(do, v) * intra_mask(spec, b_col, b_row)
  inter = dot_nt(do, state)
  if spec.has_decay:
    inter = inter * jnp.exp(b_col)
  return (dot_nn(dp, k) + inter) * spec.scale


def dkv_chunk(spec: LinearSpec, q, k, v, do, dstate, b_col, b_row, b_last):
  """dk, dv of one chunk and the state cotangent entering it (this pass runs backwards).

  With dS the cotangent of the state leaving the chunk (the final state's cotangent for the
  last chunk), on transposed tiles (rows are keys s, columns queries t):
    dk_s = scale * sum_{t>=s} M_ts (v_s . dO_t) q_t + exp(b_last - b_s) v_s dS^T
    dv_s = scale * sum_{t>=s} M_ts (k_s . q_t) dO_t + exp(b_last - b_s) k_s dS
    dS_in = exp(b_last) dS + scale * sum_t exp(b_t) q_t^T dO_t

  Returns:
    (dk [C, Dk] f32, dv [C, Dv] f32, dS_in [Dk, Dv] f32).
  """
  mask_t = intra_mask(spec, b_col, b_row, transposed=True) * spec.scale
  dk = dot_nn(dot_nt(v, do) * mask_t, q)
  dv = dot_nn(dot_nt(k, q) * mask_t, do)
  q_scaled = q.astype(jnp.float32) * spec.scale
  dk_inter, dv_inter = dot_nt(v, dstate), dot_nn(k, dstate)
  if spec.has_decay:
    k_decay = jnp.exp(b_last - b_col)
    dk_inter, dv_inter = dk_inter * k_decay, dv_inter * k_decay
    dstate_in = jnp.exp(b_last) * dstate + dot_tn(q_scaled * jnp.exp(b_col), do)
  else:
    dstate_in = dstate + dot_tn(q_scaled, do)
  return dk + dk_inter, dv + dv_inter, dstate_in


def row_views(b_row):
  """(b_col [C, 1], b_last [1, 1]) from a [1, C] row without a transpose or a lane slice.

  Mosaic handles masked lane reductions of aligned tiles everywhere; a [1, C] -> [C, 1]
  transpose is not a shape it tiles well.
  """
  c = b_row.shape[1]
  rows = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  cols = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  square = jnp.broadcast_to(b_row, (c, c))
  b_col = jnp.sum(jnp.where(rows == cols, square, 0.0), axis=1, keepdims=True)
  lane = lax.broadcasted_iota(jnp.int32, (1, c), 1)
  b_last = jnp.sum(jnp.where(lane == c - 1, b_row, 0.0), axis=1, keepdims=True)
  return b_col, b_last


def vector_views(b):
  """(b_col [C, 1], b_row [1, C], b_last scalar) from a 1-D [C] vector (Triton)."""
  c = b.shape[0]
  b_last = jnp.sum(jnp.where(lax.broadcasted_iota(jnp.int32, (c,), 0) == c - 1, b, 0.0))
  return b[:, None], b[None, :], b_last


def channel_views(b):
  """(b [C, Dk], b_last_row [1, Dk], b_last_col [Dk, 1]) of a per-channel decay tile, by masked
  reductions (and one aligned 2-D transpose) rather than slices."""
  c = b.shape[0]
  last_row = lax.broadcasted_iota(jnp.int32, b.shape, 0) == c - 1
  b_last_row = jnp.sum(jnp.where(last_row, b, 0.0), axis=0, keepdims=True)
  bt = b.T
  last_col = lax.broadcasted_iota(jnp.int32, bt.shape, 1) == c - 1
  b_last_col = jnp.sum(jnp.where(last_col, bt, 0.0), axis=1, keepdims=True)
  return b, b_last_row, b_last_col


def _channel_decays(b):
  """E[t, s, d] = exp(b_td - b_sd) for s <= t, else 0: [C, C, Dk] f32, masked before the exp."""
  c = b.shape[0]
  causal = (lax.broadcasted_iota(jnp.int32, (c, c, 1), 0)
            >= lax.broadcasted_iota(jnp.int32, (c, c, 1), 1))
  return jnp.exp(jnp.where(causal, b[:, None, :] - b[None, :, :], -jnp.inf))


def _f32(*xs):
  return tuple(x.astype(jnp.float32) for x in xs)


def channel_next_state(k, v, state, b, b_last_row, b_last_col):
  """S_out = diag(exp(b_last)) S + sum_s (k_s * exp(b_last - b_s))^T v_s: [Dk, Dv] f32."""
  return jnp.exp(b_last_col) * state + dot_tn(k.astype(jnp.float32) * jnp.exp(b_last_row - b), v)


def channel_forward_chunk(spec: LinearSpec, q, k, v, state, b, b_last_row, b_last_col):
  """`forward_chunk` with a per-channel decay tile b [C, Dk] (`channel_views`)."""
  q32, k32 = _f32(q, k)
  scores = jnp.sum(q32[:, None, :] * k32[None, :, :] * _channel_decays(b), axis=-1)
  out = (dot_nn(scores, v) + dot_nn(q32 * jnp.exp(b), state)) * spec.scale
  return out, channel_next_state(k, v, state, b, b_last_row, b_last_col)


def channel_dq_chunk(spec: LinearSpec, k, v, do, state, b):
  """`dq_chunk` with a per-channel decay: dq_td = scale * (sum_{s<=t} (dO_t . v_s) k_sd
  exp(b_td - b_sd) + exp(b_td) (dO_t S^T)_d). Returns [C, Dk] f32."""
  dp = dot_nt(do, v)
  (k32,) = _f32(k)
  intra = jnp.sum(dp[:, :, None] * k32[None, :, :] * _channel_decays(b), axis=1)
  return (intra + jnp.exp(b) * dot_nt(do, state)) * spec.scale


def channel_dkv_chunk(spec: LinearSpec, q, k, v, do, dstate, b, b_last_row, b_last_col):
  """`dkv_chunk` with a per-channel decay; with E[t, s, d] = exp(b_td - b_sd) (s <= t):
    dk_sd = scale * sum_t (dO_t . v_s) q_td E_tsd + exp(b_last,d - b_sd) (v_s dS^T)_d
    dv_s = scale * sum_t (sum_d q_td k_sd E_tsd) dO_t + (k_s * exp(b_last - b_s)) dS
    dS_in = diag(exp(b_last)) dS + scale * sum_t (q_t * exp(b_t))^T dO_t

  Returns:
    (dk [C, Dk] f32, dv [C, Dv] f32, dS_in [Dk, Dv] f32).
  """
  q32, k32 = _f32(q, k)
  decays = _channel_decays(b)
  dp = dot_nt(do, v)  # [t, s]
  to_end = jnp.exp(b_last_row - b)
  dk = (jnp.sum(dp[:, :, None] * q32[:, None, :] * decays, axis=0) * spec.scale
        + to_end * dot_nt(v, dstate))
  scores = jnp.sum(q32[:, None, :] * k32[None, :, :] * decays, axis=-1)  # [t, s]
  dv = dot_tn(scores, do) * spec.scale + dot_nn(k32 * to_end, dstate)
  dstate_in = (jnp.exp(b_last_col) * dstate
               + dot_tn(q32 * jnp.exp(b) * spec.scale, do))
  return dk, dv, dstate_in


# The variants call these with `views`: (b_col, b_row, b_last) for a scalar decay (or Nones
# without one), (b, b_last_row, b_last_col) from `channel_views` for a per-channel decay.

def chunk_forward(spec: LinearSpec, q, k, v, state, views):
  """(out [C, Dv] f32, state leaving the chunk): `forward_chunk` or its per-channel form."""
  if spec.per_channel:
    return channel_forward_chunk(spec, q, k, v, state, *views)
  return forward_chunk(spec, q, k, v, state, *views)


def chunk_next_state(spec: LinearSpec, k, v, state, views):
  """The state leaving the chunk: `next_state` or its per-channel form."""
  if spec.per_channel:
    return channel_next_state(k, v, state, *views)
  return next_state(spec, k, v, state, views[0], views[2])


def chunk_dq(spec: LinearSpec, k, v, do, state, views):
  """dq [C, Dk] f32: `dq_chunk` or its per-channel form."""
  if spec.per_channel:
    return channel_dq_chunk(spec, k, v, do, state, views[0])
  return dq_chunk(spec, k, v, do, state, views[0], views[1])


def chunk_dkv(spec: LinearSpec, q, k, v, do, dstate, views):
  """(dk, dv, dS_in): `dkv_chunk` or its per-channel form."""
  if spec.per_channel:
    return channel_dkv_chunk(spec, q, k, v, do, dstate, *views)
  return dkv_chunk(spec, q, k, v, do, dstate, *views)
