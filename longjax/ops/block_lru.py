"""A device-side LRU of hot blocks for a cache kept in host memory (InfLLM's GPU cache of
memory units): the blocks a decode step selects are read from a small device buffer, and only
those missing from it are copied over from the host, into the least recently used slots.

Shapes are static, so a step copies either nothing (every selected block is hot) or its whole
selection (some block is missing; the hot ones among them are copied again, harmlessly). With
the selection changing slowly from step to step, most steps copy nothing.

Shapes: B batch, k selected blocks per step, L slots (the hot-block budget, L >= k).
"""

import jax.numpy as jnp


def lookup(slot_block, last_used, blocks, valid, step):
  """Where each selected block is or will be, and the LRU's new bookkeeping.

  Args:
    slot_block: [B, L] int32, the block each slot holds (-1: empty).
    last_used: [B, L] int32, the step each slot was last read (-1: never).
    blocks: [B, k] int32 selected block ids, distinct where valid.
    valid: [B, k] bool.
    step: int32 [], the current step (larger than every earlier one).

  Returns:
    (slots [B, k] int32 each selected block's slot, missing [B, k] bool those to copy in,
     slot_block [B, L], last_used [B, L]).
  """
  b, slots_total = slot_block.shape
  held = (slot_block[:, None, :] == blocks[:, :, None]) & valid[..., None]  # [B, k, L]
  hit = jnp.any(held, axis=-1)
  missing = valid & ~hit
  # Victims: the least recently used slots that hold none of this step's hits, in order.
  keep = jnp.any(held, axis=1)  # [B, L]
  order = jnp.argsort(jnp.where(keep, jnp.iinfo(jnp.int32).max, last_used), axis=-1)
  rank = jnp.cumsum(missing, axis=-1) - 1
  victim = jnp.take_along_axis(order, jnp.maximum(rank, 0), axis=-1)
  slots = jnp.where(hit, jnp.argmax(held, axis=-1), victim)
  target = jnp.where(valid, slots, slots_total)  # invalid selections touch nothing
  bi = jnp.arange(b)[:, None]
  slot_block = slot_block.at[bi, jnp.where(missing, slots, slots_total)].set(blocks, mode="drop")
  last_used = last_used.at[bi, target].set(step, mode="drop")
  return slots.astype(jnp.int32), missing, slot_block, last_used


def fill(hot, slots, missing, rows):
  """hot [B, L, block, K, H] with `rows` [B, k, block, K, H] written where `missing`."""
  bi = jnp.arange(hot.shape[0])[:, None]
  return hot.at[bi, jnp.where(missing, slots, hot.shape[1])].set(rows.astype(hot.dtype),
                                                                  mode="drop")


def read(hot, slots):
  """The selected blocks' rows from the hot buffer: [B, k, block, K, H]."""
  return hot[jnp.arange(hot.shape[0])[:, None], slots]
