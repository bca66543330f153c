"""Landmark tokens in a sequence (Landmark Attention, Mohtashami & Jaggi 2023).

A landmark model sees one landmark after every `block - 1` regular tokens, so that blocks of
`block` positions end with their landmark: position i of the *landmarked* sequence is a landmark
iff (i + 1) % block == 0 (the layout `kernels_pallas.landmark` tiles). A trailing partial block
has no landmark. The model inserts the landmarks after embedding and removes their outputs
before the logits (`longjax.models.lm`), so data, losses and evaluation never see them: the
loss is not taken on landmarks because landmarks never reach the loss.

Positions: a landmark takes a position like any token (one more than the token before it), and
the regular tokens after it move up by one, counted from the start of their document in a
packed row; segment ids: a landmark belongs to the document of the token before it.
"""

import jax
import jax.numpy as jnp


def landmarked_length(length, block: int):
  """T' = T + T // (block - 1): the length after inserting landmarks into T regular tokens, or
  equally the landmarked index of regular token T (ints or int arrays)."""
  return length + length // (block - 1)


def regular_length(length, block: int):
  """Inverse of `landmarked_length`: the regular tokens among the first `length` landmarked
  positions, a block's landmark counted once it is written (ints or int arrays)."""
  return length - length // block


def _groups(x: jax.Array, block: int) -> jax.Array:
  """[B, T, ...] -> [B, G, block - 1, ...], the last group padded by repeating the last item."""
  per = block - 1
  groups = -(-x.shape[1] // per)
  widths = [(0, 0)] * x.ndim
  widths[1] = (0, groups * per - x.shape[1])
  x = jnp.pad(x, widths, mode="edge")
  return x.reshape(x.shape[0], groups, per, *x.shape[2:])


def insert_landmarks(x: jax.Array, landmark: jax.Array, block: int) -> jax.Array:
  """Inserts a landmark after every `block - 1` items of each row.

  Args:
    x: [B, T, ...] regular items (token embeddings, positions, segment ids).
    landmark: the landmark items, broadcastable to [B, G, ...] with G = ceil(T / (block - 1)):
      one per group (or one for all).
    block: tokens per block including its landmark, >= 2.

  Returns:
    [B, T', ...] with T' = `landmarked_length(T, block)`.
  """
  groups = _groups(x, block)
  fill = jnp.broadcast_to(landmark, (groups.shape[0], groups.shape[1], *groups.shape[3:]))
  out = jnp.concatenate([groups, fill.astype(x.dtype)[:, :, None]], axis=2)
  out = out.reshape(x.shape[0], -1, *x.shape[2:])
  return out[:, :landmarked_length(x.shape[1], block)]


def remove_landmarks(y: jax.Array, block: int, length: int) -> jax.Array:
  """Inverse of `insert_landmarks`: [B, T', ...] -> [B, T, ...], the regular items only."""
  groups = -(-length // (block - 1))
  widths = [(0, 0)] * y.ndim
  widths[1] = (0, groups * block - y.shape[1])
  y = jnp.pad(y, widths).reshape(y.shape[0], groups, block, *y.shape[2:])
  return y[:, :, :-1].reshape(y.shape[0], -1, *y.shape[3:])[:, :length]


def landmark_layout(positions: jax.Array, segment_ids: jax.Array | None, block: int):
  """Positions and segment ids of the landmarked sequence.

  Args:
    positions: [B, T] int32 positions of the regular tokens (restarting at each document of a
      packed row).
    segment_ids: [B, T] int32 document ids of a packed row, or None (one document per row).
    block: tokens per block including its landmark.

  Returns:
    (positions [B, T'], segment_ids [B, T'] or None): a regular token moves up by the landmarks
    inserted since the start of its document; a landmark sits one after the token before it and
    belongs to that token's document.
  """
  per = block - 1
  index = jnp.arange(positions.shape[1], dtype=jnp.int32)
  if segment_ids is None:
    start = jnp.zeros_like(positions)
  else:
    first = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                             segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(first, index, 0), axis=1)
  moved = positions + index // per - start // per
  new_positions = insert_landmarks(moved, _groups(moved, block)[:, :, -1] + 1, block)
  if segment_ids is None:
    return new_positions, None
  return new_positions, insert_landmarks(segment_ids, _groups(segment_ids, block)[:, :, -1],
                                         block)


def is_landmark(length: int, block: int) -> jax.Array:
  """[T'] bool: which positions of a landmarked sequence of length T' are landmarks."""
  return (jnp.arange(length) + 1) % block == 0
