"""The attention kernels that ship with jax: splash attention (TPU) and cuDNN (NVIDIA GPU).

`longjax.ops.attention.ATTENTION` prefers them on their backend for the cases they serve,
because they are tuned and maintained by the hardware's own teams; everything else goes to
longjax's kernels. Each comes with a `*_unsupported` check that names the first reason it
cannot serve a call (None if it can), and a wrapper that maps longjax's `AttentionMask` onto
the kernel's own arguments.

Both serve self-attention only (T == S, q_offset == 0): that is the training call, and there
every row sees at least its own token, so neither kernel meets a row with no visible key (whose
output longjax defines as zeros). Neither returns a differentiable log-sum-exp, so calls that
ask for it (ring attention, decode merges) go to longjax's kernels.
"""

import numbers

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

import kernels_pallas
from kernels_pallas import common
from longjax.ops.masks import AttentionMask

# Splash tiles queries and keys in blocks of 128 (its default `BlockSizes`); it takes no padding.
SPLASH_BLOCK = 128
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _self_attention_reason(mask: AttentionMask, q_length: int, kv_length: int) -> str | None:
  offset = mask.q_offset
  if not (isinstance(offset, numbers.Integral) and offset == 0) or q_length != kv_length:
    return (f"it serves self-attention only (T == S and a static q_offset of 0; got T={q_length}, "
            f"S={kv_length}, q_offset={offset!r})")
  if mask.global_tokens:
    return f"global tokens / sinks (global_tokens={mask.global_tokens}) are not among its masks"
  if mask.landmark_block is not None:
    return f"landmark blocks (landmark_block={mask.landmark_block}) are not among its masks"
  return None


def splash_unsupported(mask: AttentionMask, bias, *, q_length: int, kv_length: int,
                       return_lse: bool) -> str | None:
  """Why jax's splash attention cannot serve this call, or None if it can (on any backend:
  it runs interpreted on the CPU, which the tests use)."""
  if bias is not None:
    return f"it takes no logit bias (got {type(bias).__name__})"
  if return_lse:
    return "it returns no differentiable log-sum-exp (return_lse=True)"
  reason = _self_attention_reason(mask, q_length, kv_length)
  if reason is not None:
    return reason
  if q_length % SPLASH_BLOCK:
    return f"T={q_length} is not a multiple of its block of {SPLASH_BLOCK}"
  if mask.q_segment_ids is not mask.kv_segment_ids:
    # With one array for both, every query sees its own key; two arrays could leave a row empty.
    return "it takes one segment-id array for queries and keys (self-attention packing)"
  return None


def _splash_kernel(causal: bool, window: int | None, length: int, heads: int, interpret: bool):
  """Splash's kernel for one mask. Built at every trace: splash caches the costly part (the
  numpy block map, keyed by the mask), and a kernel kept across traces would carry arrays made
  in an earlier trace into the next (which `jax.export` then miscounts as extra arguments)."""
  shape = (length, length)
  if window is not None:  # (left, right) reach; right = 0 is the causal window
    head_mask = splash_mask.LocalMask(shape, (window - 1, 0 if causal else window - 1), offset=0)
  elif causal:
    head_mask = splash_mask.CausalMask(shape)
  else:
    head_mask = splash_mask.FullMask(shape)
  return splash.make_splash_mha(splash_mask.MultiHeadMask([head_mask] * heads), head_shards=1,
                                q_seq_shards=1, interpret=interpret)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: AttentionMask,
                     scale: float, interpret: bool | None = None) -> jax.Array:
  """Self-attention through jax's splash kernel (check `splash_unsupported` first).

  Args:
    q: [B, T, N, H].
    k, v: [B, T, K, H], N % K == 0 (query head n reads kv head n // (N // K), as splash does).
    mask: causal / window / shared segment ids; see `splash_unsupported`.
    scale: multiplies q.k (applied to q: splash has no scale).
    interpret: None = interpret on the CPU only.

  Returns:
    [B, T, N, H] in q.dtype.
  """
  b, t, n, _ = q.shape
  interpret = kernels_pallas.default_interpret() if interpret is None else interpret
  kernel = _splash_kernel(mask.causal, mask.window, t, n, interpret)
  heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B, T, N, H] -> [B, N, T, H]
  q, k, v = heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v)
  if mask.q_segment_ids is None:
    out = jax.vmap(kernel)(q, k, v)
  else:
    ids = jnp.broadcast_to(mask.q_segment_ids, (b, t)).astype(jnp.int32)
    out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, splash.SegmentIds(ids, ids)))(
        q, k, v, ids)
  return heads_first(out)


def cudnn_unsupported(q: jax.Array, mask: AttentionMask, bias, *, kv_length: int,
                      return_lse: bool, backend: str | None = None) -> str | None:
  """Why `jax.nn.dot_product_attention(implementation="cudnn")` cannot serve this call, or None.
  `backend`: where the call runs (None: the default backend)."""
  backend = common.backend() if backend is None else backend
  if backend != "gpu":
    return f"the backend is {backend!r}; cuDNN runs on NVIDIA GPUs"
  if bias is not None:
    return f"longjax passes it no logit bias (got {type(bias).__name__})"
  if return_lse:
    return "its log-sum-exp is not differentiable (return_lse=True)"
  reason = _self_attention_reason(mask, q.shape[1], kv_length)
  if reason is not None:
    return reason
  if mask.q_segment_ids is not None:
    return "jax.nn.dot_product_attention takes no segment ids"
  if q.dtype not in _CUDNN_DTYPES:
    return f"its flash kernel takes bfloat16 or float16, got {q.dtype}"
  h = q.shape[3]
  if h % 8 or h > 128:
    return f"its flash kernel takes head dims that are multiples of 8 up to 128, got {h}"
  capability = getattr(jax.devices()[0], "compute_capability", "0")
  if float(capability) < 8.0:
    return f"its flash kernel needs compute capability >= 8.0, got {capability}"
  return None


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: AttentionMask,
                    scale: float, implementation: str = "cudnn") -> jax.Array:
  """Self-attention through `jax.nn.dot_product_attention` (check `cudnn_unsupported` first).

  Args:
    q: [B, T, N, H]; k, v: [B, T, K, H] (jax.nn's layout and GQA head order are longjax's).
    mask: causal and/or window.
    scale: multiplies q.k.
    implementation: "cudnn"; "xla" runs the same mapping anywhere (the tests' check of it).

  Returns:
    [B, T, N, H] in q.dtype.
  """
  window = None
  if mask.window is not None:  # (left, right) reach, both inclusive
    window = (mask.window - 1, 0 if mask.causal else mask.window - 1)
  return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=mask.causal,
                                      local_window_size=window, implementation=implementation)
