"""Typed decode caches: small pytree dataclasses, one per kind of mixer state.

Every cache has `end`, the number of tokens the layer has consumed (int32 []); the model reads
only that (to continue positions), so it never depends on a mixer's layout. A cache whose class
says `rewindable` forgets the positions after `end` when `end` is set back. Every cache also
says `state_bytes_per_sequence`, the memory one sequence's state takes (what a recall study
plots against). Updates return a new
cache with `dataclasses.replace`.
"""

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp


def refuse_segments_with_cache(cache, segment_ids) -> None:
  """Raises ValueError when a mixer gets both a decode cache and packed-document segment ids."""
  if cache is not None and segment_ids is not None:
    raise ValueError("segment_ids are for packed training batches; a cache holds one sequence "
                     "per row")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys and values of every token so far, for full or sliding-window attention.

  k, v: [B, S, K, H] (keys rotated by their positions); positions: [B, S] int32 (for
  position-dependent biases); end: int32 [], the tokens written (slots 0..end-1).
  """
  k: jax.Array
  v: jax.Array
  positions: jax.Array
  end: jax.Array
  # Setting `end` back forgets the positions after it: nothing reads a slot at or after `end`,
  # and the next call writes over them (see `DecoderLM._landmark_layers`).
  rewindable: ClassVar[bool] = True

  @classmethod
  def empty(cls, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype):
    shape = (batch_size, max_length, num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               positions=jnp.zeros((batch_size, max_length), jnp.int32),
               end=jnp.zeros((), jnp.int32))

  @property
  def state_bytes_per_sequence(self) -> int:
    """Bytes one sequence's keys and values take at this capacity (grows with the context)."""
    return 2 * self.k[0].size * self.k.dtype.itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RollingCache:
  """A constant-size cache of `sinks` first tokens plus a rolling window of the latest ones
  (StreamingLLM; LM-Infinite), its size independent of the sequence length.

  k, v: [B, C, K, H] unrotated, C = sinks + window; token_index: [C] int32, the token each slot
  holds (-1 = empty); positions: [B, C] int32, the position each slot's token was given
  (LM-Infinite's true positions; StreamingLLM re-assigns positions by slot order and leaves
  them 0); end: int32 [], the tokens consumed.
  """
  k: jax.Array
  v: jax.Array
  token_index: jax.Array
  positions: jax.Array
  end: jax.Array

  @classmethod
  def empty(cls, batch_size: int, capacity: int, num_kv_heads: int, head_dim: int, dtype):
    shape = (batch_size, capacity, num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               token_index=jnp.full((capacity,), -1, jnp.int32),
               positions=jnp.zeros((batch_size, capacity), jnp.int32),
               end=jnp.zeros((), jnp.int32))

  @property
  def state_bytes_per_sequence(self) -> int:
    """Bytes one sequence's kept keys and values take (sinks + window: constant)."""
    return 2 * self.k[0].size * self.k.dtype.itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecurrentState:
  """The state of a recurrent mixer (linear attention, retention): constant in the length.

  state: [B, N, Dk, Dv'] float32 (`longjax.ops.linear_attention.state_shape`); end: int32 [],
  the tokens consumed.
  """
  state: jax.Array
  end: jax.Array

  @classmethod
  def empty(cls, shape: tuple[int, ...]):
    return cls(state=jnp.zeros(shape, jnp.float32), end=jnp.zeros((), jnp.int32))

  @property
  def state_bytes_per_sequence(self) -> int:
    """Bytes of state one sequence carries (what the recall study plots against)."""
    return self.state[0].size * self.state.dtype.itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BasedState:
  """Based's decode state (`longjax.layers.based`), constant in the length: the linear
  attention's state, the short convolution's last inputs and the window's last keys and values.

  state: [B, N, F', H + 1] float32; conv: [B, K-1, D] (the last K-1 layer inputs); k, v:
  [B, W, N, H] the last W tokens' keys (rotated) and values, oldest first (slots before the
  first token are zeros and masked); end: int32 [], the tokens consumed.
  """
  state: jax.Array
  conv: jax.Array
  k: jax.Array
  v: jax.Array
  end: jax.Array

  @property
  def state_bytes_per_sequence(self) -> int:
    """Bytes one sequence carries: linear state, convolution history and window."""
    return sum(a[0].size * a.dtype.itemsize for a in (self.state, self.conv, self.k, self.v))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SSMState:
  """A state-space mixer's decode state (Mamba, Mamba-2): the recurrence's state and the short
  convolution's last inputs, constant in the length.

  state: float32, [B, N, S, P] for Mamba-2 (heads, state size, head dim), [B, E, S] for Mamba
  (inner channels, state size); conv: [B, K-1, C] the last K-1 inputs of the convolution; end:
  int32 [], the tokens consumed; window: with a state window of w steps
  (`longjax.ops.state_collapse`), the last w steps' inputs the window subtracts again (a pytree
  of [B, w, ...] arrays), else None.
  """
  state: jax.Array
  conv: jax.Array
  end: jax.Array
  window: Any = None

  @property
  def state_bytes_per_sequence(self) -> int:
    """Bytes one sequence carries: the recurrence's state, the convolution history and the
    state window's inputs."""
    arrays = (self.state, self.conv, *jax.tree.leaves(self.window))
    return sum(a[0].size * a.dtype.itemsize for a in arrays)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockKVCache:
  """Landmark attention's cache (`longjax.layers.landmark`): every position's key and value,
  keys rotated at their offset *within their block*, because a retrieved block is re-positioned
  at every step (`longjax.ops.landmark_attention.in_block_keys`).

  k, v: [B, S, K, H], S a multiple of the block size, blocks each ending with its landmark;
  landmarks: [B, K, S / block, H] each block's landmark key again, head-major for scoring;
  end: int32 [], the positions written (landmarks included).
  """
  k: jax.Array
  v: jax.Array
  landmarks: jax.Array
  end: jax.Array
  rewindable: ClassVar[bool] = True  # as `KVCache`'s (a landmark slot is written only by one)

  @classmethod
  def empty(cls, batch_size: int, max_length: int, block: int, num_kv_heads: int,
            head_dim: int, dtype):
    """Room for `max_length` positions, rounded up to whole blocks (the blocks are then a free
    reshape of the buffer)."""
    blocks = -(-max_length // block)
    shape = (batch_size, blocks * block, num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               landmarks=jnp.zeros((batch_size, num_kv_heads, blocks, head_dim), dtype),
               end=jnp.zeros((), jnp.int32))

  @property
  def state_bytes_per_sequence(self) -> int:
    """Bytes one sequence's keys, values and rotated landmark keys take at this capacity
    (grows with the context)."""
    return sum(a[0].size * a.dtype.itemsize for a in (self.k, self.v, self.landmarks))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RetrievalCache:
  """The cache of attention with a training-free retrieval policy (`longjax.layers.retrieval`):
  every token's key and value, plus a ring of the last W rotated keys and the policy's state.

  k, v: [B, S, K, H], keys unrotated (far keys are attended at InfLLM's positions,
  `longjax.ops.retrieval`); ring_k, ring_v: [B, W, K, H] the last W tokens' keys rotated at
  their positions and values, token i in slot i % W; end: int32 [], the tokens written;
  policy: a dict of the policy's arrays (InfLLM: `prefix` [B, P, K, H] float32 sums of queries
  and `block_keys` [B, S / block, K, H]; TokenSelect: `keys_by_head` [B, K, S, H], the
  keys again for scoring, and the selection cache `last_q` [B, N, H], `last_ids` [B, top_k],
  `has_last` []).
  """
  k: jax.Array
  v: jax.Array
  ring_k: jax.Array
  ring_v: jax.Array
  end: jax.Array
  policy: dict

  @property
  def state_bytes_per_sequence(self) -> int:
    """Bytes one sequence's keys, values, ring and policy state take (grows with the
    context)."""
    arrays = (self.k, self.v, self.ring_k, self.ring_v,
              *(a for a in jax.tree.leaves(self.policy) if a.ndim))
    return sum(a[0].size * a.dtype.itemsize for a in arrays)
