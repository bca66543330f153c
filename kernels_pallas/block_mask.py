"""The static attention spec of the flash kernels: block ranges, in-tile masks and logits.

Everything a kernel needs to know about masks and biases is a small hashable `FlashSpec` (static
fields) plus a few run-time scalars (the query offset, the bias parameters of each head) and
optional per-token arrays (segment ids, positions). Nothing here materialises a [T, S] array.

Semantics (the same as `longjax.ops.masks.AttentionMask`): query row t has absolute index
i = t + q_offset, key j is visible when all of
  * j < S and t < T (padding is hidden);
  * causal: j <= i;
  * window w: i - j < w, and |i - j| < w when not causal;
  * global_tokens g (with a window): keys j < g are exempt from the window only;
  * segment ids: q_segment_ids[b, t] == kv_segment_ids[b, j].
  * landmark_block L (with causal): keys with (j + 1) % L == 0 are landmarks; query i sees
    the non-landmark keys of its own block (j // L == i // L) and the landmarks of earlier
    blocks (Landmark Attention's main softmax). It skips no block beyond causality: a key
    tile of width >= L always holds a landmark.
Logits of visible entries: x = scale * q.k; with a soft cap c, x = c * tanh(x / c); then a bias
of the distance d = |p_q - p_k| is added, where the positions p are q_positions[b, t] and
kv_positions[b, j] when given, else the indices i and j (`BIAS_KINDS`):
  * "alibi": x -= slope[n] * d;
  * "kerple_log": x -= r1[n] * log(1 + r2[n] * d);
  * "kerple_power": x -= r1[n] * d ** r2[n] (0 at d = 0, with zero gradients there).
Flash attention adds T5's bucket table and FIRE's MLP of the signed distance (see
`kernels_pallas.flash_attention`); their static layout is `bias_size`, `t5_runs`, `fire_hidden`.
The cap is applied before the bias on purpose: capping the ALiBi distance penalty would bound it
by c and make far keys as visible as near ones. Masks always use indices, never positions.

The block-range functions below run in three places: in the TPU index maps (to choose which K/V
block to copy), in kernel bodies (to choose which block to compute), and in plain Python (tests
count the visited blocks). They therefore take Python ints or int32 tracers alike.
"""

import dataclasses
import numbers

import jax.numpy as jnp
from jax import lax

from kernels_pallas.common import cdiv

# Bias kind -> number of parameters per head.
BIAS_KINDS = {"alibi": 1, "kerple_log": 2, "kerple_power": 2}


@dataclasses.dataclass(frozen=True)
class FlashSpec:
  """Static description of one flash attention call (hashable: kernels close over it).

  Attributes:
    causal: hide keys after the query's absolute index.
    window: sliding window size (>= 1) or None.
    global_tokens: leading keys exempt from the window (0: none; needs a window).
    landmark_block: landmark period L (>= 2, with causal) or None.
    q_length: real query length T (the arrays may be padded past it).
    kv_length: real key length S.
    block_q: query rows per block.
    block_k: keys per block.
    scale: multiplies q.k.
    soft_cap: logit soft cap c or None.
    bias: None or one of `BIAS_KINDS`: the logit bias of the distance (module docstring).
    has_segments: compare segment ids.
    has_positions: the bias reads per-token positions instead of indices.
    bias_size: P, bias parameters per head (the kernels' [N * P] head-major parameter array);
      0 = the fixed count of `BIAS_KINDS`. Flash attention sets it for every bias: 1 (ALiBi),
      2 (KERPLE), num_buckets (T5: head n's table column), 3F + 3 (FIRE: c, L, w1 [F], b1 [F],
      head n's w2 column [F], b2[n]; the shared ones repeated per head).
    t5_runs: T5 only: ((first signed distance i - j, bucket), ...) of each run of equal buckets
      over the clipped distances, in increasing distance; the first run's start is unused (it
      extends to -inf, as clipping does), the last run extends to +inf.
    fire_hidden: FIRE only: F, the MLP's hidden width.
  """

  causal: bool
  window: int | None
  global_tokens: int
  q_length: int
  kv_length: int
  block_q: int
  block_k: int
  scale: float
  soft_cap: float | None = None
  bias: str | None = None
  has_segments: bool = False
  has_positions: bool = False
  bias_size: int = 0
  t5_runs: tuple[tuple[int, int], ...] = ()
  fire_hidden: int = 0
  landmark_block: int | None = None

  @property
  def has_alibi(self) -> bool:
    return self.bias == "alibi"

  @property
  def num_bias_params(self) -> int:
    """P, parameters per head of the bias: `bias_size`, else 0, 1 (ALiBi) or 2 (KERPLE)."""
    if self.bias_size:
      return self.bias_size
    return BIAS_KINDS[self.bias] if self.bias is not None else 0

  @property
  def num_q_blocks(self) -> int:
    return cdiv(self.q_length, self.block_q)

  @property
  def num_kv_blocks(self) -> int:
    return cdiv(self.kv_length, self.block_k)


# Python-int-or-tracer arithmetic: plain Python for ints (tests, static bounds), jnp otherwise.
def _is_int(*xs) -> bool:
  return all(isinstance(x, numbers.Integral) for x in xs)


def _min(a, b):
  return min(a, b) if _is_int(a, b) else jnp.minimum(a, b)


def _max(a, b):
  return max(a, b) if _is_int(a, b) else jnp.maximum(a, b)


def _clip(x, lo, hi):
  return _min(_max(x, lo), hi)


def _where(cond, a, b):
  if isinstance(cond, (bool, jnp.bool_)) and _is_int(a, b):
    return a if cond else b
  return jnp.where(cond, a, b)


def int_div(a, b: int):
  """a // b for a >= 0 (truncating division is cheaper than floor division in kernels)."""
  return a // b if _is_int(a) else lax.div(a, jnp.int32(b))


def _span_blocks(span: int, block: int) -> int:
  """Most blocks that `span` consecutive indices can touch, whatever their alignment."""
  return (block - 1 + span - 1) // block + 1


def kv_block_ranges(spec: FlashSpec, q_block, q_offset):
  """The KV blocks a query block can see, by index alone, as two disjoint ranges.

  Args:
    spec: the static spec.
    q_block: query block index (int or int32 scalar).
    q_offset: absolute index of query row 0 (int or int32 scalar).

  Returns:
    ((g_lo, g_hi), (lo, hi)): block index ranges [lo, hi); the first holds the global tokens
    (empty without them), the second the causal/window range, starting at or after g_hi.
    Segment ids are not considered (they are not static).
  """
  bq, bk, t, s = spec.block_q, spec.block_k, spec.q_length, spec.kv_length
  q_start = q_block * bq
  q_last = _min(q_start + bq, t) - 1  # last real row
  first, last = q_offset + q_start, q_offset + q_last
  hi_all = s
  if spec.causal:
    hi_all = _clip(last + 1, 0, s)
  lo, hi = 0, hi_all
  if spec.window is not None:
    lo = _clip(first - spec.window + 1, 0, s)
    if not spec.causal:
      hi = _clip(_min(hi, last + spec.window), 0, s)
  lo_b = int_div(lo, bk)
  hi_b = _where(hi > lo, int_div(hi + bk - 1, bk), lo_b)
  g_hi_b = 0
  if spec.global_tokens:
    g_hi_b = int_div(_min(spec.global_tokens, hi_all) + bk - 1, bk)
    lo_b = _max(lo_b, g_hi_b)
    hi_b = _max(hi_b, lo_b)
  return (0, g_hi_b), (lo_b, hi_b)


def kv_steps_bound(spec: FlashSpec) -> int:
  """Static upper bound of the number of KV blocks any query block visits (for any offset)."""
  n = spec.num_kv_blocks
  if spec.window is None:
    return n
  w = spec.window
  span = spec.block_q + w - 1 if spec.causal else spec.block_q + 2 * w - 2
  local = _span_blocks(span, spec.block_k)
  return min(n, local + cdiv(spec.global_tokens, spec.block_k))


def kv_step_to_block(spec: FlashSpec, q_block, step, q_offset):
  """Maps the `step`-th visited KV block of a query block to its block index.

  Steps past the visible blocks map to the last visible block (so that a TPU pipeline finds the
  same block index as the step before and copies nothing) and are flagged invalid.

  Returns:
    (block, valid): int32 scalars (ints when every input is an int), valid a bool.
  """
  (g_lo, g_hi), (lo, hi) = kv_block_ranges(spec, q_block, q_offset)
  n0 = g_hi - g_lo
  total = n0 + (hi - lo)
  block = _where(step < n0, g_lo + step, lo + step - n0)
  last = _where(hi > lo, hi - 1, _max(g_hi - 1, 0))
  valid = step < total
  return _where(valid, block, last), valid


def q_block_range(spec: FlashSpec, kv_block, q_offset):
  """The query blocks that can see any key of a KV block, by index alone: [lo, hi)."""
  bq, bk, t, s = spec.block_q, spec.block_k, spec.q_length, spec.kv_length
  kv_start = kv_block * bk
  kv_last = _min(kv_start + bk, s) - 1  # last real key
  lo, hi = 0, t
  if spec.causal:
    lo = _max(lo, kv_start - q_offset)
  if spec.window is not None:
    w = spec.window
    w_hi = kv_last + w - q_offset  # rows with i - j < w for some key j of the block
    w_lo = kv_start - w + 1 - q_offset
    if spec.global_tokens:
      leading = kv_start < spec.global_tokens  # a block with a global key is seen by all rows
      w_hi = _where(leading, t, w_hi)
      w_lo = _where(leading, 0, w_lo)
    hi = _min(hi, w_hi)
    if not spec.causal:
      lo = _max(lo, w_lo)
  lo, hi = _clip(lo, 0, t), _clip(hi, 0, t)
  lo_b = int_div(lo, bq)
  hi_b = _where(hi > lo, int_div(hi + bq - 1, bq), lo_b)
  return lo_b, hi_b


def q_steps_bound(spec: FlashSpec) -> int:
  """Static upper bound of the number of query blocks any KV block is seen by."""
  n = spec.num_q_blocks
  if spec.window is None or spec.global_tokens:
    return n
  w = spec.window
  span = spec.block_k + w - 1 if spec.causal else spec.block_k + 2 * w - 2
  return min(n, _span_blocks(span, spec.block_q))


def q_step_to_block(spec: FlashSpec, kv_block, step, q_offset):
  """Maps the `step`-th query block that sees a KV block to its index; see `kv_step_to_block`."""
  lo, hi = q_block_range(spec, kv_block, q_offset)
  valid = step < hi - lo
  return _where(valid, lo + step, _max(hi - 1, 0)), valid


def landmark_visible(i, j, block: int):
  """Landmark Attention's main-softmax visibility of key j to query i (int32 absolute indices
  >= 0, so truncating division is floor division; j <= i assumed, i.e. causal): the query's own
  block's regular keys and earlier blocks' landmarks. Integer div/rem lower in Mosaic and Triton
  alike; `longjax.ops.masks` evaluates the same rule."""
  block = jnp.int32(block)
  landmark = lax.rem(j + 1, block) == 0
  key_block, query_block = lax.div(j, block), lax.div(i, block)
  return jnp.where(landmark, key_block < query_block, key_block == query_block)


def tile_visibility(spec: FlashSpec, q_start, kv_start, q_offset, shape, *, transposed=False):
  """Index-based visibility of one tile (segment ids excluded).

  Args:
    spec: the static spec.
    q_start: first query row of the tile (int32 scalar).
    kv_start: first key of the tile (int32 scalar).
    q_offset: absolute index of query row 0.
    shape: (block_q, block_k), or (block_k, block_q) when `transposed`.
    transposed: the tile is keys x queries (the dK/dV kernels work on transposed logits).

  Returns:
    (visible, distance): bool and int32 arrays of `shape`; distance = i - j.
  """
  q_axis, kv_axis = (1, 0) if transposed else (0, 1)
  rows = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
  cols = kv_start + lax.broadcasted_iota(jnp.int32, shape, kv_axis)
  distance = rows + q_offset - cols
  visible = None

  def both(a, b):
    return b if a is None else a & b

  # Padding exists only when a length is not a multiple of its block.
  if spec.q_length % spec.block_q:
    visible = both(visible, rows < spec.q_length)
  if spec.kv_length % spec.block_k:
    visible = both(visible, cols < spec.kv_length)
  if spec.causal:
    visible = both(visible, distance >= 0)
  if spec.window is not None:
    near = distance < spec.window
    if not spec.causal:
      near &= distance > -spec.window
    if spec.global_tokens:
      near |= cols < spec.global_tokens
    visible = both(visible, near)
  if spec.landmark_block is not None:
    visible = both(visible, landmark_visible(rows + q_offset, cols, spec.landmark_block))
  if visible is None:
    visible = jnp.ones(shape, jnp.bool_)
  return visible, distance


# Decoding: a few queries (one query block, block_q >= q_length) against a cache whose valid
# length is a run-time value. The visited blocks (global first, then local) are shared evenly
# by `num_splits` partitions, each reducing its share in parallel (flash-decoding).
def decode_kv_ranges(spec: FlashSpec, q_offset, cache_length):
  """The KV blocks the decode queries can see, clipped to the valid cache.

  Args:
    spec: the static spec; its single query block covers all queries.
    q_offset: absolute index of query row 0 (int or int32 scalar).
    cache_length: number of valid keys, in [0, spec.kv_length] (int or int32 scalar).

  Returns:
    (g_hi, lo, hi): global blocks [0, g_hi) and local blocks [lo, hi), disjoint, g_hi <= lo.
  """
  bk = spec.block_k
  # Key ranges first, then blocks: clipping block ranges to the valid cache would keep a block
  # whose window keys all lie past cache_length (when q_offset > cache_length - T).
  hi = _clip(_min(q_offset + spec.q_length, cache_length), 0, spec.kv_length)  # causal, valid
  lo = 0 if spec.window is None else _clip(q_offset - spec.window + 1, 0, spec.kv_length)
  g_hi = int_div(_min(spec.global_tokens, hi) + bk - 1, bk) if spec.global_tokens else 0
  lo_b = _max(int_div(lo, bk), g_hi)
  hi_b = _max(_where(hi > lo, int_div(hi + bk - 1, bk), lo_b), lo_b)
  return g_hi, lo_b, hi_b


def split_range(total, num_splits: int, split):
  """Partition `split`'s share [start, end) of `total` visited steps (ceil(total / num_splits)
  each, so the last partitions may be short or empty)."""
  per = int_div(total + num_splits - 1, num_splits)
  start = split * per
  return start, _max(_min(start + per, total), start)


def split_steps_bound(spec: FlashSpec, num_splits: int) -> int:
  """Static upper bound of the steps of one partition (for any offset and cache length)."""
  return cdiv(kv_steps_bound(spec), num_splits)


def split_step_to_block(spec: FlashSpec, num_splits: int, split, step, q_offset, cache_length):
  """Maps the `step`-th block of partition `split` to its KV block index.

  Steps past the partition's share repeat its last block (a TPU pipeline then copies nothing)
  and are flagged invalid; see `kv_step_to_block`.

  Returns:
    (block, valid): int32 scalars (ints when every input is an int), valid a bool.
  """
  g_hi, lo, hi = decode_kv_ranges(spec, q_offset, cache_length)
  start, end = split_range(g_hi + hi - lo, num_splits, split)
  visited = start + step
  valid = visited < end
  visited = _where(valid, visited, _max(end - 1, 0))
  block = _where(visited < g_hi, visited, lo + visited - g_hi)
  return _min(block, spec.num_kv_blocks - 1), valid
