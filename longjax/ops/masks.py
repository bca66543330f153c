"""Attention mask specs: which keys each query may see, evaluated densely or one block at a time.

A mask is a small static spec (causal, window) plus a few arrays (query offset, segment ids); it is
never stored as a `[T, S]` array. Implementations ask it for one block of visibility at a time
(`block`), for the key (or query) index ranges a block of queries (or keys) can see at all
(`kv_index_ranges`, `q_index_range`; loops use these as bounds to skip empty blocks), and whether
a block may contain any visible entry (`block_may_be_nonempty`). The dense reference evaluates the
same spec as one block covering everything, so all implementations share one definition.

Indexing: keys are numbered 0..S-1; query row t has absolute index `q_offset + t`. With a KV cache
of length S holding `q_offset` tokens, new queries at `q_offset` make causal masking hide the
unwritten tail of the cache.
"""

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp

from kernels_pallas.block_mask import landmark_visible

# Stand-in for "no bound" on lengths; far above any sequence length, far below int32 overflow
# when offsets and windows are added to it.
_UNBOUNDED = 2**30


def _block_indices(start, size: int) -> jax.Array:
  return jnp.asarray(start, jnp.int32) + jnp.arange(size, dtype=jnp.int32)


def take_block(x: jax.Array, start, size: int) -> jax.Array:
  """`x[:, start:start + size]` where indices past the end repeat the last entry.

  Blockwise ops pad sequences to a multiple of the block, so a block may run past the real
  length; repeating real entries (rather than a fill value) keeps min/max ranges conservative, and
  the rows/columns past the end are masked separately by length.

  Args:
    x: [B, L] per-position array (segment ids, positions).
    start: int32 scalar (may be traced).
    size: static block length.

  Returns:
    [B, size] with the dtype of `x`.
  """
  idx = jnp.clip(_block_indices(start, size), 0, x.shape[1] - 1)
  return jnp.take(x, idx, axis=1)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["q_offset", "q_segment_ids", "kv_segment_ids"],
    meta_fields=["causal", "window", "global_tokens", "landmark_block"],
)
@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionMask:
  """Which keys each query may attend to.

  Query at absolute index i and key j (both within their real lengths) may attend when all of:
    * causal: j <= i;
    * window (if set): i - j < window; without `causal` the window is symmetric, |i - j| < window
      (local bidirectional attention), so that a window never exposes more of the future than of
      the past;
    * global_tokens (with a window): keys j < global_tokens are exempt from the window (not from
      causality, lengths or segments). This is the Lambda-shaped mask of LM-Infinite (Han et al.
      2024) and the attention sinks of StreamingLLM (Xiao et al. 2024): every query sees the
      first keys plus its local window. The first keys are counted by index (cache slot), so in
      a packed row only the first document has them;
    * segment ids (if set): q_segment_ids[b, t] == kv_segment_ids[b, j] (packed documents; the
      ids are only compared, so a padding segment 0 attends within itself).
    * landmark_block L (if set; needs `causal`): the main softmax of Landmark Attention
      (Mohtashami & Jaggi 2023). Keys j with (j + 1) % L == 0 are landmarks, each closing block
      j // L; query i sees the non-landmark keys of its own block (i // L == j // L) and the
      landmarks of earlier blocks (j // L < i // L), never its own block's landmark. With
      `return_lse`, exp(scale q.k_landmark - lse) is then block g's retrieval score, the main
      probability that `kernels_pallas.landmark_attention` spreads over the block's tokens.

  Attributes:
    causal: static; hide keys after the query's absolute index.
    window: static; sliding window size (>= 1) or None.
    global_tokens: static; number of leading keys every query sees despite the window (0: none).
    landmark_block: static; landmark period L >= 2 (a regular token and its landmark) or None.
    q_offset: int32 scalar (array or Python int); absolute index of query row 0.
    q_segment_ids: [B, T] int32 or None.
    kv_segment_ids: [B, S] int32 or None; given together with `q_segment_ids`.
  """

  causal: bool = True
  window: int | None = None
  global_tokens: int = 0
  landmark_block: int | None = None
  q_offset: jax.Array | int = 0
  q_segment_ids: jax.Array | None = None
  kv_segment_ids: jax.Array | None = None

  def __post_init__(self):
    # Only static fields are checked here: jax rebuilds the dataclass with placeholder leaves
    # while tracing, so array fields are checked in `validate`.
    if self.window is not None and (not isinstance(self.window, numbers.Integral)
                                    or self.window < 1):
      raise ValueError(f"window must be a positive int or None, got {self.window!r}")
    if not isinstance(self.global_tokens, numbers.Integral) or self.global_tokens < 0:
      raise ValueError(f"global_tokens must be an int >= 0, got {self.global_tokens!r}")
    if self.global_tokens and self.window is None:
      # Without a window every key is visible already: the setting would do nothing.
      raise ValueError(f"global_tokens={self.global_tokens} needs a window")
    if self.landmark_block is not None:
      if not isinstance(self.landmark_block, numbers.Integral) or self.landmark_block < 2:
        raise ValueError("landmark_block must be an int >= 2 (a regular token and its "
                         f"landmark) or None, got {self.landmark_block!r}")
      if not self.causal:
        raise ValueError(f"landmark_block={self.landmark_block} needs causal=True (landmarks "
                         "summarise earlier blocks)")

  @property
  def has_segments(self) -> bool:
    """Whether visibility depends on array contents (segment ids), not only on indices."""
    return self.q_segment_ids is not None

  def validate(self, batch: int, q_length: int, kv_length: int) -> None:
    """Raises ValueError when the arrays do not fit queries [B, T] and keys [B, S]."""
    if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
      raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    if jnp.ndim(self.q_offset) != 0:
      raise ValueError(f"q_offset must be a scalar, got shape {jnp.shape(self.q_offset)}")
    if self.has_segments:
      for name, ids, length in (("q_segment_ids", self.q_segment_ids, q_length),
                                ("kv_segment_ids", self.kv_segment_ids, kv_length)):
        if ids.ndim != 2 or ids.shape[1] != length or ids.shape[0] not in (1, batch):
          raise ValueError(f"{name} must have shape [{batch} or 1, {length}], got {ids.shape}")

  def _lengths(self, q_length, kv_length):
    """Real lengths: given ones, else those of the segment ids, else unbounded."""
    if q_length is None:
      q_length = self.q_segment_ids.shape[1] if self.has_segments else _UNBOUNDED
    if kv_length is None:
      kv_length = self.kv_segment_ids.shape[1] if self.has_segments else _UNBOUNDED
    return q_length, kv_length

  def block(self, q_start, q_size: int, kv_start, kv_size: int, *,
            q_length: int | None = None, kv_length: int | None = None) -> jax.Array:
    """Visibility of queries [q_start, q_start + q_size) x keys [kv_start, kv_start + kv_size).

    Args:
      q_start: int32 scalar (may be traced); first query row of the block.
      q_size: static block height.
      kv_start: int32 scalar (may be traced); first key of the block.
      kv_size: static block width.
      q_length: real number of query rows T; rows at or past it (padding) see nothing. None:
        the segment ids' length, or unbounded.
      kv_length: real number of keys S; keys at or past it (padding) are hidden. None: as above.

    Returns:
      bool [B or 1, 1, q_size, kv_size]; the leading axis is B only with segment ids, the second
      axis broadcasts over heads.
    """
    q_length, kv_length = self._lengths(q_length, kv_length)
    qi = _block_indices(q_start, q_size)
    kj = _block_indices(kv_start, kv_size)
    visible = (qi < q_length)[:, None] & (kj < kv_length)[None, :]
    distance = (self.q_offset + qi)[:, None] - kj[None, :]  # i - j
    if self.causal:
      visible &= distance >= 0
    if self.window is not None:
      near = distance < self.window
      if not self.causal:
        near &= -distance < self.window
      if self.global_tokens:
        near |= (kj < self.global_tokens)[None, :]
      visible &= near
    if self.landmark_block is not None:
      visible &= landmark_visible(self.q_offset + qi[:, None], kj[None, :], self.landmark_block)
    visible = visible[None, None]
    if self.has_segments:
      q_ids = take_block(self.q_segment_ids, q_start, q_size)
      kv_ids = take_block(self.kv_segment_ids, kv_start, kv_size)
      visible = visible & (q_ids[:, None, :, None] == kv_ids[:, None, None, :])
    return visible

  def dense(self, q_length: int, kv_length: int) -> jax.Array:
    """The whole mask, bool [B or 1, 1, T, S]: for references and tests only."""
    return self.block(0, q_length, 0, kv_length, q_length=q_length, kv_length=kv_length)

  def kv_index_ranges(self, q_start, q_size: int, *, q_length: int | None = None,
                      kv_length: int | None = None) -> tuple[tuple[jax.Array, jax.Array], ...]:
    """Key ranges [lo, hi) whose union holds every key a row of the block can see, by index.

    One range normally; with `global_tokens` two, the leading keys (0, min(global_tokens, hi))
    and the local window, so that loops can skip the keys between them. Ranges may overlap or be
    empty (hi <= lo). Segment ids are not considered (see `block_may_be_nonempty`).

    Args:
      q_start: int32 scalar; first query row of the block.
      q_size: static block height.
      q_length: real number of query rows (see `block`).
      kv_length: real number of keys (see `block`).

    Returns:
      A tuple of (lo, hi) int32 scalar pairs, each with 0 <= lo, hi <= kv_length.
    """
    q_length, kv_length = self._lengths(q_length, kv_length)
    q_start = jnp.asarray(q_start, jnp.int32)
    q_last = jnp.minimum(q_start + q_size, q_length) - 1  # last real row of the block
    first = self.q_offset + q_start  # absolute index of the first row
    last = self.q_offset + q_last
    # Bounds that hold for every key, leading ones included: lengths and causality.
    hi_all = jnp.int32(kv_length)
    if self.causal:
      hi_all = jnp.minimum(hi_all, last + 1)
    hi_all = jnp.where(q_last < q_start, 0, hi_all)  # the block holds only padded rows
    lo, hi = jnp.int32(0), hi_all
    if self.window is not None:
      lo = jnp.maximum(lo, first - self.window + 1)
      if not self.causal:
        hi = jnp.minimum(hi, last + self.window)
    ranges = [(lo, hi)]
    if self.global_tokens:
      ranges.insert(0, (jnp.int32(0), jnp.minimum(hi_all, self.global_tokens)))
    return tuple((jnp.clip(a, 0, kv_length).astype(jnp.int32),
                  jnp.clip(b, 0, kv_length).astype(jnp.int32)) for a, b in ranges)

  def kv_index_range(self, q_start, q_size: int, *, q_length: int | None = None,
                     kv_length: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Keys [lo, hi) outside which no query row in the block can see anything, by index alone.

    The hull of `kv_index_ranges`: with `global_tokens` it spans from key 0 to the window, so
    loops that want to skip the keys in between use `kv_index_ranges` instead.

    Args:
      q_start: int32 scalar; first query row of the block.
      q_size: static block height.
      q_length: real number of query rows (see `block`).
      kv_length: real number of keys (see `block`).

    Returns:
      (lo, hi) int32 scalars with 0 <= lo, hi <= kv_length; empty when hi <= lo.
    """
    ranges = self.kv_index_ranges(q_start, q_size, q_length=q_length, kv_length=kv_length)
    if len(ranges) == 1:
      return ranges[0]
    # An empty range must not widen the hull.
    los = [jnp.where(hi > lo, lo, _UNBOUNDED) for lo, hi in ranges]
    his = [jnp.where(hi > lo, hi, 0) for lo, hi in ranges]
    lo, hi = functools.reduce(jnp.minimum, los), functools.reduce(jnp.maximum, his)
    return jnp.where(hi > 0, lo, 0).astype(jnp.int32), hi.astype(jnp.int32)

  def q_index_range(self, kv_start, kv_size: int, *, q_length: int | None = None,
                    kv_length: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Query rows [lo, hi) outside which no row can see any key in the block, by index alone.

    The transpose of `kv_index_range`, used by backward passes that loop over query blocks for a
    fixed key block.

    Args:
      kv_start: int32 scalar; first key of the block.
      kv_size: static block width.
      q_length: real number of query rows (see `block`).
      kv_length: real number of keys (see `block`).

    Returns:
      (lo, hi) int32 scalars with 0 <= lo, hi <= q_length; empty when hi <= lo.
    """
    q_length, kv_length = self._lengths(q_length, kv_length)
    kv_start = jnp.asarray(kv_start, jnp.int32)
    kv_last = jnp.minimum(kv_start + kv_size, kv_length) - 1
    lo = jnp.int32(0)
    hi = jnp.int32(q_length)
    # Bounds on the absolute index i = q_offset + row, converted to rows at the end.
    if self.causal:
      lo = jnp.maximum(lo, kv_start - self.q_offset)
    if self.window is not None:
      window_hi = kv_last + self.window - self.q_offset
      window_lo = kv_start - self.window + 1 - self.q_offset
      if self.global_tokens:
        # A block holding a leading key is seen by every row the other rules allow.
        leading = kv_start < self.global_tokens
        window_hi = jnp.where(leading, _UNBOUNDED, window_hi)
        window_lo = jnp.where(leading, -_UNBOUNDED, window_lo)
      hi = jnp.minimum(hi, window_hi)
      if not self.causal:
        lo = jnp.maximum(lo, window_lo)
    hi = jnp.where(kv_last < kv_start, 0, hi)  # the block holds only padded keys
    lo = jnp.clip(lo, 0, q_length)
    hi = jnp.clip(hi, 0, q_length)
    return lo.astype(jnp.int32), hi.astype(jnp.int32)

  def block_may_be_nonempty(self, q_start, q_size: int, kv_start, kv_size: int, *,
                            q_length: int | None = None,
                            kv_length: int | None = None) -> jax.Array:
    """Conservative test for a visible entry in a block (False means certainly empty).

    Index rules (causal, window, global tokens, lengths) are exact at block granularity; segment
    ids are judged by whether the blocks' [min, max] id ranges overlap in some batch row, which
    can only err towards True.

    Args: as for `block`.

    Returns:
      bool scalar.
    """
    kv_start = jnp.asarray(kv_start, jnp.int32)
    result = jnp.bool_(False)
    for lo, hi in self.kv_index_ranges(q_start, q_size, q_length=q_length, kv_length=kv_length):
      result |= (hi > lo) & (kv_start < hi) & (kv_start + kv_size > lo)
    if self.has_segments:
      # Padded rows/keys repeat the last real id (see `take_block`), so each range still covers
      # every real id in its block; padding can widen a range but never hide a real match.
      q_ids = take_block(self.q_segment_ids, q_start, q_size)
      kv_ids = take_block(self.kv_segment_ids, kv_start, kv_size)
      overlap = ((q_ids.min(axis=1) <= kv_ids.max(axis=1))
                 & (kv_ids.min(axis=1) <= q_ids.max(axis=1)))
      result &= jnp.any(overlap)
    return result


def document_keep(segment_ids, batch: int, length: int) -> jax.Array:
  """[B, T] float32: 0 where a new document starts (`segment_ids[t] != segment_ids[t-1]`,
  t > 0), else 1 — the factor a recurrence multiplies its state by so that no state crosses a
  document boundary. All ones when `segment_ids` is None."""
  if segment_ids is None:
    return jnp.ones((batch, length), jnp.float32)
  starts = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.ones((batch, 1), bool), ~starts], axis=1).astype(jnp.float32)
