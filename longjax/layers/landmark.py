"""Landmark attention mixer (Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access
Infinite Context Length for Transformers"): softmax attention whose blocks are reached through
their landmark tokens, trained with the grouped softmax and decoded with top-k block retrieval.

The model inserts a landmark after every `block_size - 1` tokens when any layer is a landmark
layer (`MixerSpec.landmark_block`; `longjax.ops.landmarks`), so `model.mixers=landmark` trains
on any config with no other flag. Training and prefill without a cache run the grouped softmax
over the whole sequence (`longjax.ops.landmark_attention.landmark_attention`); with a cache
(`experiments.sample`, `experiments.evaluate`) each query attends to its own block and to the
`top_k` blocks whose landmarks score highest for it, per head, at the paper's positions
(`retrieval_attention`), so the attended context stays (top_k + 2) blocks long.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from longjax import posenc
from longjax.errors import ConfigError
from longjax.layers import attention
from longjax.layers import caches
from longjax.layers import dims
from longjax.layers.mixer import MixerSpec
from longjax.layers.positional import POSENCS
from longjax.layers.positional_base import AttentionPositions
from longjax.ops import landmark_attention as ops


class LandmarkAttention(nnx.Module):
  """Causal landmark attention with N query heads sharing K key/value heads.

  Shapes: x [B, T, D] of a landmarked sequence (landmarks at (i + 1) % block_size == 0);
  projections to [B, T, N, H] and [B, T, K, H]. The cache keeps keys rotated at their offset
  within their block (`caches.BlockKVCache`): a retrieved block is re-positioned per query by
  rotating the query instead (`longjax.ops.landmark_attention.in_block_keys`).
  """

  def __init__(self, width: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               positional: AttentionPositions, block_size: int, top_k: int, impl: str = "auto",
               out_init_scale: float = 1.0, dtype=jnp.float32, rngs: nnx.Rngs):
    self.w_q, self.w_kv, self.w_out = attention.projection_params(
        rngs, width, num_heads, num_kv_heads, head_dim, out_init_scale)
    self.positional = positional
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.block_size = block_size
    self.top_k = top_k
    self.impl = impl
    self.dtype = dtype

  def init_cache(self, batch_size: int, max_length: int, dtype=None):
    """An empty `BlockKVCache` for `max_length` positions of the landmarked sequence, rounded
    up to whole blocks (the blocks are then a free reshape of the buffer: no per-step copy)."""
    return caches.BlockKVCache.empty(batch_size, max_length, self.block_size, self.num_kv_heads,
                                     self.head_dim, dtype or self.dtype)

  def _rotate(self, x, positions, is_key):
    return self.positional.rotate(x, positions, is_key=is_key)

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache=None):
    """Args: x [B, T, D] (landmarked); positions [B, T] int32; segment_ids [B, T] int32 (packed
    documents, training only); cache from `init_cache` or a previous call. Returns
    (y [B, T, D], cache)."""
    q, k, v = attention.project_qkv(x, self.w_q, self.w_kv, self.dtype)
    if cache is None:
      q = self.positional.rotate(q, positions)
      k = self.positional.rotate(k, positions, is_key=True)
      out = ops.landmark_attention(q, k, v, block=self.block_size, segment_ids=segment_ids,
                                   impl=self.impl)
    else:
      caches.refuse_segments_with_cache(cache, segment_ids)
      end, block = cache.end, self.block_size
      index = end + jnp.arange(x.shape[1], dtype=jnp.int32)
      k = ops.in_block_keys(k, index, self._rotate, block).astype(cache.k.dtype)
      k_all = jax.lax.dynamic_update_slice(cache.k, k, (0, end, 0, 0))
      v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, end, 0, 0))
      # New landmarks' keys also go to the contiguous array scoring reads; others are dropped.
      slot = jnp.where((index + 1) % block == 0, index // block, cache.landmarks.shape[2])
      landmarks = cache.landmarks.at[:, :, slot].set(k.transpose(0, 2, 1, 3), mode="drop")
      cache = caches.BlockKVCache(k=k_all, v=v_all, landmarks=landmarks, end=end + x.shape[1])
      out = ops.retrieval_attention(q, k_all.astype(self.dtype), v_all.astype(self.dtype),
                                    landmarks.astype(self.dtype), index, block=block,
                                    top_k=self.top_k, rotate=self._rotate)
    return jnp.einsum("btnh,nhd->btd", out, self.w_out.value.astype(self.dtype)), cache


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.block_size = 64  # positions per block incl. its landmark (paper: 50 tokens + 1)
  c.top_k = 4       # blocks retrieved per query and head when decoding from a cache
  c.impl = "auto"   # auto | xla | pallas (training form; retrieval is XLA)
  return c


def validate(model, c, prefix: str = "model.landmark") -> None:
  """Raises ConfigError for the first bad field of the landmark section `c`."""
  if not isinstance(c.block_size, int) or c.block_size < 2:
    raise ConfigError(f"{prefix}.block_size", c.block_size,
                      "must be an int >= 2 (regular tokens and their landmark)")
  if not isinstance(c.top_k, int) or c.top_k < 1:
    raise ConfigError(f"{prefix}.top_k", c.top_k, "must be an int >= 1 (blocks retrieved)")
  if c.impl not in ops.IMPLS:
    raise ConfigError(f"{prefix}.impl", c.impl, "unknown choice", list(ops.IMPLS))
  p = model.posenc
  if POSENCS[p.kind].logit_bias:
    # Retrieved blocks are re-positioned per query by rotating their keys; a logit bias would
    # need its distances re-derived inside the grouped softmax.
    raise ConfigError("model.posenc.kind", p.kind, "landmark attention takes rotary or no "
                      "position encodings, not a logit bias",
                      sorted(k for k, e in POSENCS.items() if not e.logit_bias))
  if p.kind == "clex" or p.scaling in posenc.rope_scaling.DYNAMIC_SCALINGS:
    raise ConfigError("model.posenc.scaling" if p.kind != "clex" else "model.posenc.kind",
                      p.scaling if p.kind != "clex" else p.kind,
                      "landmark attention needs frequencies that do not depend on the context "
                      "length (its retrieved context is re-positioned into a short window)")


def build(model, c, rngs) -> LandmarkAttention:
  return LandmarkAttention(
      model.width, model.num_heads, dims.num_kv_heads(model), dims.head_dim(model),
      positional=POSENCS[model.posenc.kind].attention(model, rngs), block_size=c.block_size,
      top_k=c.top_k, impl=c.impl, out_init_scale=dims.out_init_scale(model),
      dtype=dims.DTYPES[model.dtype], rngs=rngs)


SPEC = MixerSpec(name="landmark", section="landmark", defaults=defaults, validate=validate,
                 build=build, cache_types=(caches.BlockKVCache,),
                 landmark_block=lambda c: c.block_size,
                 evaluates_with_cache=lambda c: True)  # evaluation retrieves, as decoding
