"""Training-time position transforms: positions seen in training other than 0..n-1.

Each transform is a pure function `(positions [B, T] int32, segment_ids [B, T] int32, rng) ->
positions [B, T] int32` plus keyword hyperparameters, registered by config name in
`POSITION_TRANSFORMS` (`model.posenc.train_positions`). They act on the ids given to the model
only: tokens, targets and masks are untouched, so evaluation needs no transform.

Rows are packed documents: a segment is a maximal run of equal, non-zero `segment_ids`; its
new positions depend only on its length (they restart per segment), and padding (segment id 0)
keeps the positions it had.
"""

from collections.abc import Callable
import functools

import jax
import jax.numpy as jnp


def _segment_bounds(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Start index and length of each token's segment: segment_ids [B, T] -> 2 x [B, T] int32."""
  t = segment_ids.shape[-1]
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  changes = segment_ids[:, 1:] != segment_ids[:, :-1]
  edge = jnp.ones_like(changes[:, :1])
  is_first = jnp.concatenate([edge, changes], axis=-1)
  is_last = jnp.concatenate([changes, edge], axis=-1)
  start = jax.lax.cummax(jnp.where(is_first, index, 0), axis=1)
  end = jax.lax.cummin(jnp.where(is_last, index, t), axis=1, reverse=True)
  return start, end - start + 1


def _at_segment_start(values: jax.Array, start: jax.Array) -> jax.Array:
  """values [B, T, ...] read at each token's segment start, so a segment shares one draw."""
  return jax.vmap(lambda v, s: v[s])(values, start)


def none(positions: jax.Array, segment_ids: jax.Array, rng: jax.Array) -> jax.Array:
  """The identity: positions as the data pipeline made them."""
  del segment_ids, rng
  return positions


def randomized(positions: jax.Array, segment_ids: jax.Array, rng: jax.Array, *,
               max_position: int) -> jax.Array:
  """Randomized positional encodings (Ruoss et al. 2023).

  A segment of n tokens gets n distinct positions drawn uniformly without replacement from
  [0, max_position), sorted so that token order is kept. The segments of one row take
  consecutive, disjoint slices of one random permutation of [0, max_position): each segment's
  subset is still uniform over the n-subsets (attention never crosses segments, so the
  disjointness is invisible to the model), and one permutation per row costs O(max_position)
  instead of one per segment.

  Args:
    positions: [B, T] int32, kept on padding.
    segment_ids: [B, T] int32, 0 = padding.
    rng: a PRNG key.
    max_position: exclusive upper bound of the sampled positions, >= T.

  Returns:
    [B, T] int32 positions, strictly increasing within each segment.
  """
  b, t = positions.shape
  if max_position < t:
    raise ValueError(f"max_position={max_position} must be >= the sequence length {t}")
  perms = jax.vmap(lambda k: jax.random.permutation(k, max_position))(jax.random.split(rng, b))
  return _sorted_per_segment(perms[:, :t], positions, segment_ids)


def _sorted_per_segment(drawn: jax.Array, positions: jax.Array,
                        segment_ids: jax.Array) -> jax.Array:
  """drawn [B, T] distinct values, sorted within each segment; padding keeps `positions`."""
  start, _ = _segment_bounds(segment_ids)
  # Segments are contiguous, so sorting by (segment start, value) sorts within segments only.
  _, ordered = jax.lax.sort((start, drawn.astype(jnp.int32)), dimension=-1, num_keys=2)
  return jnp.where(segment_ids != 0, ordered, positions).astype(positions.dtype)


def clex(positions: jax.Array, segment_ids: jax.Array, rng: jax.Array, *,
         max_factor: int) -> jax.Array:
  """CLEX's training positions (Chen et al. 2024; `longjax.posenc.clex`).

  One scale t is drawn uniformly from 1..max_factor per batch; each row then gets positions as
  in `randomized` with max_position = t T, and the row's largest position is moved to t T - 1,
  so that max(positions) + 1 = t T and the CLEX encoding (t = ceil(l / L), L = T) recovers t.
  With t = 1 the positions are 0..T-1 for a row holding one document.

  Args:
    positions: [B, T] int32, kept on padding.
    segment_ids: [B, T] int32, 0 = padding.
    rng: a PRNG key.
    max_factor: the largest sampled scale t_max >= 1.

  Returns:
    [B, T] int32 positions, strictly increasing within each segment, all < t T.
  """
  b, t = positions.shape
  scale_key, perm_key = jax.random.split(rng)
  scale = jax.random.randint(scale_key, (), 1, max_factor + 1)
  limit = scale * t
  # A uniform T-subset of [0, t T) with t traced: the first T entries, in permutation order, of
  # a permutation of the static range [0, t_max T) that are < t T (there are t T >= T of them).
  perms = jax.vmap(lambda k: jax.random.permutation(k, max_factor * t))(
      jax.random.split(perm_key, b))
  beyond = (perms >= limit).astype(jnp.int32)
  _, kept = jax.lax.sort((beyond, perms), dimension=-1, num_keys=1, is_stable=True)
  out = _sorted_per_segment(kept[:, :t], positions, segment_ids)
  real = segment_ids != 0
  row_max = jnp.max(jnp.where(real, out, -1), axis=-1, keepdims=True)
  return jnp.where(real & (out == row_max), limit - 1, out).astype(positions.dtype)


def pose(positions: jax.Array, segment_ids: jax.Array, rng: jax.Array, *, num_chunks: int,
         target_length: int) -> jax.Array:
  """Positional skip-wise training, PoSE (Zhu et al. 2023).

  A segment of n tokens is cut into `num_chunks` contiguous chunks at cut points drawn uniformly
  from 1..n-1 (sorted; equal cut points leave a chunk empty). Chunk i keeps its in-segment
  indices shifted by a skip bias u_i, drawn as in the paper: u_0 = 0 and
  u_i ~ U{u_(i-1), ..., target_length - n}, so positions stay contiguous within a chunk,
  increase across chunks and the last one, n - 1 + u_last, is < target_length. The model thus
  sees relative distances up to target_length - 1 while attending over only n tokens.

  Args:
    positions: [B, T] int32, kept on padding.
    segment_ids: [B, T] int32, 0 = padding.
    rng: a PRNG key.
    num_chunks: chunks per segment, >= 1 (1 = the whole segment shifted by 0).
    target_length: exclusive upper bound of the positions, >= T.

  Returns:
    [B, T] int32 positions, strictly increasing within each segment.
  """
  b, t = positions.shape
  if num_chunks < 1:
    raise ValueError(f"num_chunks={num_chunks} must be >= 1")
  if target_length < t:
    raise ValueError(f"target_length={target_length} must be >= the sequence length {t}")
  start, length = _segment_bounds(segment_ids)
  index = jnp.arange(t, dtype=jnp.int32)[None] - start  # in-segment index 0..n-1
  cut_key, bias_key = jax.random.split(rng)
  # One set of draws per token; each segment uses the set at its first token.
  cut_u = _at_segment_start(jax.random.uniform(cut_key, (b, t, num_chunks - 1)), start)
  bias_u = _at_segment_start(jax.random.uniform(bias_key, (b, t, num_chunks - 1)), start)
  cuts = jnp.sort(1 + jnp.floor(cut_u * (length[..., None] - 1)).astype(jnp.int32), axis=-1)
  max_bias = target_length - length
  bias = jnp.zeros_like(index)
  previous = jnp.zeros_like(index)
  for i in range(num_chunks - 1):
    # u_i uniform over {u_(i-1), ..., max_bias}: floor(z * count) with z in [0, 1).
    u = previous + jnp.floor(bias_u[..., i] * (max_bias - previous + 1)).astype(jnp.int32)
    u = jnp.minimum(u, max_bias)  # guards z * count rounding up to count in float32
    bias = jnp.where(index >= cuts[..., i], u, bias)
    previous = u
  return jnp.where(segment_ids != 0, index + bias, positions).astype(positions.dtype)


POSITION_TRANSFORMS: dict[str, Callable[..., jax.Array]] = {
    "none": none,
    "randomized": randomized,
    "pose": pose,
    "clex": clex,
}


def make_position_transform(posenc_config) -> Callable[..., jax.Array] | None:
  """The `(positions, segment_ids, rng) -> positions` of `model.posenc`; None for "none"."""
  name = posenc_config.train_positions
  if name not in POSITION_TRANSFORMS:
    raise ValueError(f"unknown position transform {name!r}; valid: {sorted(POSITION_TRANSFORMS)}")
  if name == "none":
    return None
  if name == "randomized":
    return functools.partial(randomized, max_position=posenc_config.randomized_max_position)
  if name == "clex":
    return functools.partial(clex, max_factor=posenc_config.clex_max_factor)
  return functools.partial(pose, num_chunks=posenc_config.pose_chunks,
                           target_length=posenc_config.pose_target_length)
