"""Decode attention in Pallas: a few queries against a long KV cache, split over KV partitions.

`decode_attention` attends T queries (T small: 1 for plain decoding, a few for speculative or
chunked decoding) [B, T, N, H] to a KV cache [B, S, K, H] of which the first `cache_length`
entries are valid. The cache length is a run-time value (a scalar or one per batch element):
changing it does not recompile. The visited KV blocks (those inside the valid cache and the
window, plus the global-token blocks) are shared by `num_splits` partitions that run in parallel
and each return a partial output and its log-sum-exp; `softmax.merge_partials` combines them
(flash-decoding, Dao et al. 2023; Lean Attention, Sanovar et al. 2024). Blocks outside are
neither computed nor copied (a TPU pipeline still fetches one block for a partition left with
no work, e.g. when the cache is short). The G = N // K query heads of a KV head share its K/V blocks
(grouped-query attention without repeating K/V).

Positions: query row t sits at absolute cache index i = q_offset + t, with q_offset defaulting
to cache_length - T (the queries are the last T entries written to the cache). Key j is visible
when j < cache_length and j <= i, and with a window w when i - j < w or j < global_tokens: the
causal semantics of `flash_attention` with the same q_offset, so for one batch element
  decode_attention(q, k, v, cache_length=L) ==
      flash_attention(q, k[:, :L], v[:, :L], q_offset=L - T).
Logits, soft cap and ALiBi are as in `flash_attention`.

Inference only: there is no VJP (decoding does not train), so differentiating raises.

Two kernel variants, as for flash attention: `decode_attention_tpu` (Mosaic: a sequential grid
axis per partition, scalar-prefetched lengths) and `decode_attention_gpu` (Triton: a loop per
partition); `common.kernel_variant` picks one, and both run in interpret mode on CPU.
"""

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import block_mask
from kernels_pallas import common
from kernels_pallas.decode import gpu as decode_attention_gpu
from kernels_pallas.decode import tpu as decode_attention_tpu
from kernels_pallas import softmax

_VARIANTS = {"tpu": decode_attention_tpu, "gpu": decode_attention_gpu}


def _check_inputs(q, k, v, cache_length, q_offset, window, global_tokens, alibi_slopes,
                  logit_soft_cap):
  b, t, n, h = q.shape
  if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"k_cache and v_cache must be [B={b}, S, K, H={h}], got {k.shape} and "
                     f"{v.shape}")
  if n % k.shape[2]:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={k.shape[2]}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k_cache, v_cache must share a dtype, got {q.dtype}, {k.dtype}, "
                     f"{v.dtype}")
  if t < 1 or k.shape[1] < 1:
    raise ValueError(f"empty inputs are not supported: T={t}, S={k.shape[1]}")
  for name, x in (("cache_length", cache_length), ("q_offset", q_offset)):
    if x is not None and jnp.shape(x) not in ((), (b,)):
      raise ValueError(f"{name} must be a scalar or have shape [B={b}], got {jnp.shape(x)}")
  if window is not None and (not isinstance(window, numbers.Integral) or window < 1):
    raise ValueError(f"window must be a positive int or None, got {window!r}")
  if not isinstance(global_tokens, numbers.Integral) or global_tokens < 0:
    raise ValueError(f"global_tokens must be an int >= 0, got {global_tokens!r}")
  if global_tokens and window is None:
    raise ValueError(f"global_tokens={global_tokens} needs a window")
  if alibi_slopes is not None and jnp.shape(alibi_slopes) != (n,):
    raise ValueError(f"alibi_slopes must have shape [N={n}], got {jnp.shape(alibi_slopes)}")
  if logit_soft_cap is not None and not logit_soft_cap > 0:
    raise ValueError(f"logit_soft_cap must be positive or None, got {logit_soft_cap!r}")


def _positions(b, t, s, cache_length, q_offset):
  """[B] int32 cache lengths clipped to [0, S] and [B] query offsets (default length - T)."""
  cache_length = jnp.clip(jnp.broadcast_to(jnp.asarray(cache_length, jnp.int32), (b,)), 0, s)
  if q_offset is None:
    return cache_length, cache_length - t
  return cache_length, jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))


def _default_num_splits(variant: str, interpret: bool, programs: int, max_steps: int) -> int:
  """Partitions when the caller gives none: enough to occupy the device, never more than blocks.

  The interpreter runs programs one after another, so it gets one. On GPU, B * K * P programs
  should cover the streaming multiprocessors (132 on an H100) at least once; on TPU the
  partition axis only helps to spread work over a chip's (up to 2) TensorCores when B * K is 1.
  Not tuned on hardware: no accelerator was available.
  """
  if interpret:
    return 1
  want = common.cdiv(128, programs) if variant == "gpu" else (2 if programs == 1 else 1)
  return max(1, min(want, max_steps))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _partials(variant, spec, num_splits, interpret, *args):
  """The variant's kernel; a custom JVP that refuses, so that differentiating fails loudly
  instead of differentiating the kernel body or silently giving zeros."""
  return _VARIANTS[variant].forward(spec, num_splits, *args, interpret=interpret)


@_partials.defjvp
def _partials_jvp(variant, spec, num_splits, interpret, primals, tangents):
  del variant, spec, num_splits, interpret, primals, tangents
  raise NotImplementedError("decode_attention is inference-only: it has no derivative; use "
                            "flash_attention (which has a VJP) to train")


def decode_attention(q, k_cache, v_cache, *, cache_length, q_offset=None,
                     window: int | None = None, global_tokens: int = 0, alibi_slopes=None,
                     logit_soft_cap: float | None = None, scale: float | None = None,
                     block_k: int | None = None, num_splits: int | None = None,
                     return_lse: bool = False, interpret: bool | None = None,
                     backend: str | None = None):
  """Causal softmax attention of a few queries to the valid prefix of a KV cache.

  Args:
    q: [B, T, N, H] queries, T small.
    k_cache: [B, S, K, H] keys, N % K == 0 (same dtype as q). Entries at or past cache_length
      are hidden; those in a partly valid block are still multiplied by 0, so keep them finite
      (zero-initialised caches are).
    v_cache: [B, S, K, H] values.
    cache_length: int32 scalar or [B] (may be traced; clipped to [0, S]): valid cache entries.
    q_offset: int32 scalar or [B] (may be traced), the absolute index of query row 0; None means
      cache_length - T. Rows with no visible key (e.g. i < 0) give zeros and lse = -inf.
    window: sliding window w: keys with i - j >= w are hidden.
    global_tokens: keys j < global_tokens are exempt from the window (sinks, LM-Infinite).
    alibi_slopes: [N] float: logits -= slopes[n] * (i - j).
    logit_soft_cap: c: logits = c * tanh(logits / c) (before the ALiBi bias).
    scale: multiplies q.k; None means H ** -0.5.
    block_k: keys per block; None picks `common.default_block_sizes`. S is padded to a multiple
      of it (a copy of the cache: allocate caches in multiples of the block).
    num_splits: P, partitions of the visited blocks reduced in parallel; None picks by device.
    return_lse: also return the log-sum-exp of each row's logits.
    interpret: run the Pallas interpreter; None means only on CPU.
    backend: kernel variant override, "tpu" or "gpu"; None picks by backend.

  Returns:
    out [B, T, N, H] in q.dtype; with `return_lse`, (out, lse) with lse [B, N, T] float32.
  """
  _check_inputs(q, k_cache, v_cache, cache_length, q_offset, window, global_tokens,
                alibi_slopes, logit_soft_cap)
  b, t, n, h = q.shape
  s, nk = k_cache.shape[1], k_cache.shape[2]
  g = n // nk
  variant = common.kernel_variant(backend)
  interpret = common.default_interpret() if interpret is None else bool(interpret)
  rows = g * t  # folded rows (g, t) of one KV head, padded to the variant's tile
  if variant == "tpu":
    padded_rows, width = common.cdiv(rows, 8) * 8, h
  else:  # Triton tiles: powers of two, 16 at least; zero features change neither q.k nor p v
    padded_rows, width = max(16, common.next_power_of_2(rows)), max(16, common.next_power_of_2(h))
  block_k = common.default_block_sizes(variant, rows, s)[1] if block_k is None else int(block_k)
  if block_k < 1:
    raise ValueError(f"block_k must be positive, got {block_k}")
  if not interpret and variant == "tpu" and block_k % 128:
    raise ValueError(f"the TPU kernel needs block_k % 128 == 0 (vreg lanes), got {block_k}")
  if not interpret and variant == "gpu" and (block_k < 16 or block_k & (block_k - 1)):
    raise ValueError(f"the GPU (Triton) kernel needs a power-of-two block_k >= 16, got "
                     f"{block_k}")
  spec = block_mask.FlashSpec(
      causal=True, window=window, global_tokens=global_tokens, q_length=t, kv_length=s,
      block_q=t, block_k=block_k, scale=h ** -0.5 if scale is None else float(scale),
      soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
      bias=None if alibi_slopes is None else "alibi")
  max_steps = block_mask.kv_steps_bound(spec)
  if num_splits is None:
    num_splits = _default_num_splits(variant, interpret, b * nk, max_steps)
  elif num_splits < 1:
    raise ValueError(f"num_splits must be >= 1, got {num_splits}")
  num_splits = min(int(num_splits), max_steps)  # more would only add empty partitions

  cache_length, offsets = _positions(b, t, s, cache_length, q_offset)
  # Fold (g, t) into rows: [B, T, K, G, H] -> [B, K, G * T, H]; O(T N H), next to O(S K H).
  qf = q.reshape(b, t, nk, g, h).transpose(0, 2, 3, 1, 4).reshape(b, nk, rows, h)
  qf = common.pad_to_multiple(common.pad_to_multiple(qf, 2, padded_rows), 3, width)
  k, v = (common.pad_to_multiple(common.pad_to_multiple(x, 1, block_k), 3, width)
          for x in (k_cache, v_cache))
  if variant == "tpu":
    if decode_attention_tpu.fused_heads_layout(nk, h):
      k, v = (x.reshape(b, x.shape[1], nk * h) for x in (k, v))  # free: no copy
    else:
      k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))
  r = np.arange(padded_rows)
  shift = jnp.asarray(np.where(r < rows, r % t, 0) - r, jnp.int32)
  slopes = None
  if alibi_slopes is not None:
    per_head = jnp.asarray(alibi_slopes, jnp.float32).reshape(nk, g)
    slopes = common.pad_to_multiple(jnp.repeat(per_head, t, axis=1), 1, padded_rows)
  out, lse = _partials(variant, spec, num_splits, interpret, qf, k, v, cache_length, offsets,
                       shift, slopes)
  out, lse = softmax.merge_partials(out, lse, axis=2)  # [B, K, Rp, W], [B, K, Rp]
  out = out[:, :, :rows, :h].reshape(b, nk, g, t, h).transpose(0, 3, 1, 2, 4)
  out = out.reshape(b, t, n, h).astype(q.dtype)
  lse = lse[:, :, :rows].reshape(b, n, t)
  return (out, lse) if return_lse else out


def decode_attention_reference(q, k_cache, v_cache, *, cache_length, q_offset=None,
                               window: int | None = None, global_tokens: int = 0,
                               alibi_slopes=None, logit_soft_cap: float | None = None,
                               scale: float | None = None, return_lse: bool = False):
  """Dense decode attention with the semantics of `decode_attention`; [B, N, T, S] logits.

  Args: as for `decode_attention` (without blocks, partitions, interpreter or variant).

  Returns:
    out [B, T, N, H] in q.dtype; with `return_lse`, (out, lse [B, N, T] float32).
  """
  _check_inputs(q, k_cache, v_cache, cache_length, q_offset, window, global_tokens,
                alibi_slopes, logit_soft_cap)
  b, t, _, h = q.shape
  s = k_cache.shape[1]
  cache_length, offsets = _positions(b, t, s, cache_length, q_offset)
  scale = h ** -0.5 if scale is None else float(scale)
  logits = softmax.grouped_logits(q, k_cache) * scale
  if logit_soft_cap is not None:
    logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
  cols = jnp.arange(s)
  distance = (offsets[:, None, None] + jnp.arange(t)[None, :, None]) - cols  # [B, T, S]
  if alibi_slopes is not None:
    slopes = jnp.asarray(alibi_slopes, jnp.float32)
    logits = logits - slopes[:, None, None] * jnp.abs(distance)[:, None].astype(jnp.float32)
  visible = (distance >= 0) & (cols < cache_length[:, None, None])
  if window is not None:
    visible &= (distance < window) | (cols < global_tokens)
  out, lse = softmax.masked_softmax_attention(logits, visible[:, None], v_cache)
  out = out.astype(q.dtype)  # lse: -inf for rows that see nothing
  return (out, lse) if return_lse else out
