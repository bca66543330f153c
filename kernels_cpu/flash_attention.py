"""Fused flash attention on the CPU (C++ via XLA FFI), forward and backward, with log-sum-exp.

`flash_attention` has the semantics of `longjax.ops.dot_product_attention` for the masks it
takes (causal, window, global tokens, a runtime `q_offset`, segment ids) and ALiBi, the one
position bias it computes in-kernel (slopes differentiable, from explicit positions): float32 maths
whatever the input dtype (inputs are cast up and results cast back), lse the natural log of each
row's softmax normaliser, rows with no visible key giving zeros and lse = -inf. The backward is
FlashAttention-2's: probabilities recomputed from the saved lse, D = rowsum(dO * O) - dlse (so a
cotangent on lse, as ring attention's merge produces, is exact).

The kernels are in `flash_attention.cc`; `build.py` compiles them on first use.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_cpu import build

HEAD_DIM_MULTIPLE = 16
BLOCK_Q = 128  # query rows per block of the forward kernel (kForwardBlockQ)
BLOCK_K = 128  # keys per block (kBlockK)


def unsupported(head_dim: int) -> str | None:
  """Why the kernel cannot serve a head dimension (or the machine), or None if it can."""
  if head_dim % HEAD_DIM_MULTIPLE:
    return f"head dim {head_dim} is not a multiple of {HEAD_DIM_MULTIPLE}"
  return build.unavailable_reason()


def _token_pair(q_side, kv_side):
  """A (query, key) pair of per-token int32 arrays, or [1, 1] placeholders when absent (the
  kernels take every operand; the `segments` / `alibi` attributes say which are real)."""
  if q_side is None:
    dummy = jnp.zeros((1, 1), jnp.int32)
    return dummy, dummy
  return q_side.astype(jnp.int32), kv_side.astype(jnp.int32)


def _mask_operands(q_offset, q_segment_ids, kv_segment_ids):
  return (jnp.asarray(q_offset, jnp.int32).reshape(()),
          *_token_pair(q_segment_ids, kv_segment_ids))


def _attrs(static):
  scale, causal, window, global_tokens, landmark_block, segments, alibi = static
  return dict(scale=np.float32(scale), causal=bool(causal), window=np.int64(window or 0),
              global_tokens=np.int64(global_tokens), landmark_block=np.int64(landmark_block or 0),
              segments=bool(segments), alibi=bool(alibi))


def _forward(static, q, k, v, slopes, mask_ops, position_ops):
  b, t, n, h = q.shape
  k, v = k.astype(jnp.float32), v.astype(jnp.float32)
  keys_transposed, values_by_head = _forward_layouts(k, v, t)
  out, lse = jax.ffi.ffi_call(
      "LongjaxFlashForward",
      (jax.ShapeDtypeStruct((b, t, n, h), jnp.float32),
       jax.ShapeDtypeStruct((b, n, t), jnp.float32)),
      vmap_method="sequential",
  )(q.astype(jnp.float32), k, keys_transposed, v, values_by_head, *mask_ops,
    slopes.astype(jnp.float32), *position_ops, **_attrs(static))
  return out, lse


def _forward_layouts(k, v, q_length):
  """f32 (k [B, S, K, H], v) -> (keys transposed, values by head) for the forward kernel.

  Keys transposed: [B, K, S_blocks, H, BLOCK_K], each key block transposed on its own (zeros
  past S), so that a block's rows of keys lie BLOCK_K floats apart; values by head: [B, K, S, H],
  a head's rows H floats apart (kernel: ForwardBlock). Only when the queries span several of the
  kernel's query blocks: with one block each key block is read once anyway, the kernel
  transposes it in cache and reads the values in place; [1, 1, 1, 1] placeholders say so
  (decode steps then do not copy the whole cache).
  """
  if q_length <= BLOCK_Q:
    placeholder = jnp.zeros((1, 1, 1, 1), jnp.float32)
    return placeholder, placeholder
  b, s, kv_heads, h = k.shape
  blocks = -(-s // BLOCK_K)
  padded = jnp.pad(k, ((0, 0), (0, blocks * BLOCK_K - s), (0, 0), (0, 0)))
  keys_transposed = padded.reshape(b, blocks, BLOCK_K, kv_heads, h).transpose(0, 3, 1, 4, 2)
  return keys_transposed, v.transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(static, q, k, v, slopes, mask_ops, position_ops):
  out, lse = _forward(static, q, k, v, slopes, mask_ops, position_ops)
  return out.astype(q.dtype), lse


def _attention_fwd(static, q, k, v, slopes, mask_ops, position_ops):
  out, lse = _forward(static, q, k, v, slopes, mask_ops, position_ops)
  return (out.astype(q.dtype), lse), (q, k, v, slopes, mask_ops, position_ops, out, lse)


def _attention_bwd(static, residuals, cotangents):
  q, k, v, slopes, mask_ops, position_ops, out, lse = residuals
  dout, dlse = cotangents
  dout = dout.astype(jnp.float32)
  delta = jnp.einsum("btnh,btnh->bnt", dout, out) - dlse
  b, t, n, h = q.shape
  # q, dout and dq by head, [B, N, T, H]: the kernel streams a head's rows once per key block.
  by_head = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731  (its own inverse)
  dq, dk, dv, dslopes = jax.ffi.ffi_call(
      "LongjaxFlashBackward",
      (jax.ShapeDtypeStruct((b, n, t, h), jnp.float32),
       jax.ShapeDtypeStruct(k.shape, jnp.float32), jax.ShapeDtypeStruct(v.shape, jnp.float32),
       jax.ShapeDtypeStruct((b, n), jnp.float32)),
      vmap_method="sequential",
  )(by_head(q.astype(jnp.float32)), k.astype(jnp.float32), v.astype(jnp.float32),
    by_head(dout), lse, delta, *mask_ops, slopes.astype(jnp.float32), *position_ops,
    **_attrs(static))
  dq = by_head(dq)
  # Without ALiBi `slopes` is a [1] placeholder and the kernel's d(slopes) are zeros.
  dslopes = dslopes.sum(axis=0) if static[-1] else jnp.zeros_like(slopes, jnp.float32)
  integer_zeros = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0),
                               (mask_ops, position_ops))
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          dslopes.astype(slopes.dtype), *integer_zeros)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                    causal: bool = True, window: int | None = None, global_tokens: int = 0,
                    landmark_block: int | None = None, q_offset: jax.Array | int = 0,
                    q_segment_ids: jax.Array | None = None,
                    kv_segment_ids: jax.Array | None = None, alibi_slopes: jax.Array | None = None,
                    q_positions: jax.Array | None = None,
                    kv_positions: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Softmax attention fused on the CPU.

  Args:
    q: [B, T, N, H] queries (H a multiple of 16).
    k: [B, S, K, H] keys, N % K == 0; query head n uses kv head n // (N // K).
    v: [B, S, K, H] values.
    scale: logit scale.
    causal: hide keys after the query's absolute index q_offset + t.
    window: None or a window w >= 1: i - j < w (causal) or |i - j| < w, except keys below
      `global_tokens`.
    global_tokens: leading keys exempt from the window.
    landmark_block: None or L >= 2 (with `causal`): Landmark Attention's main softmax; keys with
      (j + 1) % L == 0 are landmarks, and query i sees its own block's non-landmark keys and
      the landmarks of earlier blocks.
    q_offset: int32 scalar, may be traced (no recompilation when it changes).
    q_segment_ids: None or [B or 1, T] int32; keys are visible only within the same segment.
    kv_segment_ids: [B or 1, S] int32, given with `q_segment_ids`.
    alibi_slopes: None or [N] float: ALiBi adds -slope[n] * |q_pos - kv_pos| to the logits
      (after scaling); differentiable.
    q_positions: [B or 1, T] int32 positions of the queries (with `alibi_slopes`).
    kv_positions: [B or 1, S] int32 positions of the keys.

  Returns:
    out [B, T, N, H] in q.dtype and lse [B, N, T] float32.
  """
  build.ensure_loaded()
  reason = unsupported(q.shape[-1])
  if reason is not None:
    raise ValueError(f"kernels_cpu.flash_attention cannot serve this call: {reason}")
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError("q_segment_ids and kv_segment_ids must be given together")
  alibi = alibi_slopes is not None
  if alibi and (q_positions is None or kv_positions is None):
    raise ValueError("alibi_slopes needs q_positions and kv_positions")
  if alibi and jnp.shape(alibi_slopes) != (q.shape[2],):
    raise ValueError(f"alibi_slopes must have shape [{q.shape[2]}] (one per query head), "
                     f"got {jnp.shape(alibi_slopes)}")
  if landmark_block is not None and (not causal or landmark_block < 2):
    raise ValueError(f"landmark_block={landmark_block!r} needs causal=True and L >= 2")
  static = (float(scale), bool(causal), window, int(global_tokens), landmark_block,
            q_segment_ids is not None, alibi)
  slopes = jnp.asarray(alibi_slopes) if alibi else jnp.zeros((1,), jnp.float32)
  return _attention(static, q, k, v, slopes,
                    _mask_operands(q_offset, q_segment_ids, kv_segment_ids),
                    _token_pair(q_positions if alibi else None, kv_positions))
