"""Softmax dot-product attention: its table of implementations and the dense reference.

`dot_product_attention` is what layers call; `impl` picks the implementation from `ATTENTION`,
and "auto" is resolved by `longjax.ops.dispatch.resolve` only. Implementations share one set of
semantics:
  * GQA: query head n uses kv head n // (N // K); K/V are never repeated in memory.
  * logits = scale * q.k (+ bias) in float32; softmax statistics in float32; matmuls run in the
    input dtype with float32 accumulation (`preferred_element_type`).
  * rows with no visible key output zeros and lse = -inf, with finite gradients.
  * lse is the natural log of the softmax normaliser of the scaled, biased logits.
  * mask arrays get zero gradients (integers: offsets, segment ids); the bias's floating-point
    arrays (learned tables, KERPLE/FIRE parameters) get their gradients in every implementation,
    its integer arrays (positions) none.
"""

import dataclasses
import functools
from typing import Any

from absl import logging
import jax

import kernels_cpu
import kernels_pallas
from kernels_pallas import common
from kernels_pallas import softmax
from longjax.ops import attention_bundled
from longjax.ops import dispatch
from longjax.ops.attention_blockwise import blockwise_attention
from longjax.ops.masks import AttentionMask

# Up to this many queries against a longer causal cache count as decoding (`_is_decode`).
DECODE_MAX_QUERIES = 16


def _is_decode(mask: AttentionMask, q_length: int, kv_length: int) -> bool:
  """Whether impl="pallas" serves a call with the decode kernel: a few causal queries of one
  sequence per row against a longer KV cache (training calls have T == S)."""
  return (mask.causal and mask.q_segment_ids is None and q_length < kv_length
          and q_length <= DECODE_MAX_QUERIES)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _pallas_decode(q, k, v, q_offset, window, global_tokens, scale, block):
  """A decode call under impl="pallas": (out, lse) from the split-KV decode kernel.

  Keys past the last query's index are hidden by causality, so the valid cache is q_offset + T
  entries and the kernel skips the rest. The decode kernel has no derivative; the backward is the
  flash kernel's, which serves the same call (T < S, run-time q_offset), recomputing its
  forward, which costs little next to the backward for T <= DECODE_MAX_QUERIES.
  """
  return kernels_pallas.decode_attention(
      q, k, v, cache_length=q_offset + q.shape[1], q_offset=q_offset, window=window,
      global_tokens=global_tokens, scale=scale, block_k=block, return_lse=True)


def _pallas_decode_fwd(q, k, v, q_offset, window, global_tokens, scale, block):
  out = _pallas_decode(q, k, v, q_offset, window, global_tokens, scale, block)
  return out, (q, k, v, q_offset)


def _pallas_decode_bwd(window, global_tokens, scale, block, residuals, cotangents):
  q, k, v, q_offset = residuals
  flash = functools.partial(
      kernels_pallas.flash_attention, causal=True, window=window, global_tokens=global_tokens,
      q_offset=q_offset, scale=scale, block_q=block, block_k=block, return_lse=True)
  _, vjp = jax.vjp(flash, q, k, v)
  return (*vjp(cotangents), None)


_pallas_decode.defvjp(_pallas_decode_fwd, _pallas_decode_bwd)


def pallas_unsupported(mask: AttentionMask, bias) -> str | None:
  """Why `kernels_pallas.flash_attention` cannot serve this case, or None if it can."""
  del mask  # every AttentionMask field maps onto the kernel's mask spec
  if bias is not None and _pallas_bias(bias) is None:
    # AlibiBias, KerpleBias, T5Bias and FireBias map onto the kernel's in-kernel biases (from
    # explicit positions); any other bias has no kernel.
    return (f"it has no in-kernel {type(bias).__name__}; "
            "use impl='blockwise' or 'reference'")
  return None


def cpu_unsupported(bias, head_dim: int, backend: str | None = None) -> str | None:
  """Why `kernels_cpu.flash_attention` (the fused CPU kernel) cannot serve this case, or None.

  Every `AttentionMask` field maps onto the kernel's arguments, so only the bias, the head dim
  and the machine (backend, a C++ compiler) matter.
  """
  from longjax.ops import biases  # pylint: disable=g-import-not-at-top
  backend = common.backend() if backend is None else backend
  if backend != "cpu":
    return f"the backend is {backend!r}; the kernel runs on the CPU only"
  if bias is not None and not isinstance(bias, biases.AlibiBias):
    return (f"it has no in-kernel {type(bias).__name__} (ALiBi is its one position bias); "
            "use impl='blockwise'")
  return kernels_cpu.flash_attention_unsupported(head_dim)


@functools.cache
def _warn_cpu_fallback(reason: str, xla_op: str) -> None:
  """Once per process and reason: a silent fallback would cost 2x in speed with no hint why."""
  logging.warning("the fused CPU attention kernel cannot serve this call (%s); XLA's %s "
                  "attention runs instead, about 2x slower", reason, xla_op)


def _pallas_bias(bias) -> dict | None:
  """`flash_attention` keywords of a bias (kind, parameters, positions); None if unsupported."""
  from longjax.ops import biases  # pylint: disable=g-import-not-at-top
  if bias is None:
    return {}
  options = {}
  if isinstance(bias, biases.AlibiBias):
    kind, params = "alibi", (bias.slopes,)
  elif isinstance(bias, biases.KerpleBias) and bias.kind in ("log", "power"):
    kind, params = f"kerple_{bias.kind}", (bias.r1, bias.r2)
  elif isinstance(bias, biases.T5Bias):
    kind, params = "t5", (bias.table,)
    options = dict(t5_max_distance=bias.max_distance, t5_bidirectional=bias.bidirectional)
  elif isinstance(bias, biases.FireBias):
    kind, params = "fire", tuple(bias.params)  # FireParams' order is the kernel's
  else:
    return None
  return dict(bias_kind=kind, bias_params=params, q_positions=bias.q_positions,
              kv_positions=bias.kv_positions, **options)


def default_block_size() -> int:
  """Block length C of the blockwise op when the caller gives none.

  CPU: 128, measured (causal, f32, N=8, H=64, fwd+bwd, 2 shared cores, two runs): fastest or
  within timing noise of the fastest at T = S in {512, 2048, 4096}, B in {1, 4} (e.g. T=S=2048,
  B=4: 0.89-1.15 s at 128, 0.98-1.28 s at 256, 0.95-1.75 s at 512, 1.5 s at 1024); a
  [N, 128, 128] f32 tile stays in the 1 MiB per-core L2 and small blocks waste less work on the
  causal diagonal. Non-causal attention ran ~10% faster at 256, not enough to split the default.
  GPU/TPU: 512, a common flash-attention tile, not measured here (no accelerator was available);
  the Pallas kernels will bring their own.
  """
  return 128 if common.backend() == "cpu" else 512


@dataclasses.dataclass(frozen=True)
class AttentionCall:
  """What the implementation checks see of one attention call (`longjax.ops.dispatch`).

  Attributes:
    q: [B, T, N, H] queries; k: [B, S, K, H] keys (arrays or ShapeDtypeStructs: only .shape
      and .dtype are read).
    mask: the `AttentionMask`.
    bias: None or a block bias.
    block_size: the block length C the XLA blockwise op would use.
    return_lse: whether the caller needs the log-sum-exp.
  """
  q: Any
  k: Any
  mask: AttentionMask
  bias: Any = None
  block_size: int | None = None
  return_lse: bool = False

  @property
  def q_length(self) -> int:
    return self.q.shape[1]

  @property
  def kv_length(self) -> int:
    return self.k.shape[1]


def dense_passed_over(call, context: dispatch.Context) -> str | None:
  """Why "auto" prefers the blockwise XLA op to the dense reference for this call, or None.

  The dense reference runs when all keys fit in one block (kv_length <= block_size) or when
  decoding (T <= `DECODE_MAX_QUERIES`). With one key block the dense logits are [T, S <= C],
  the same O(T*C) memory class as blockwise; the plain definition is then the simpler program
  (no padding or loops; ~40% less compile time) at a small run-time cost on the CPU (T=S=128,
  B=1 fwd+bwd: 1.4 ms vs 1.1 ms blockwise). With more keys the dense [T, S] logits make its
  fwd+bwd temp memory quadratic (10 GiB vs 69 MiB at T=S=8192, N=8, H=64) and on the CPU it is
  also 2-8x slower than blockwise from T = S = 512 up. Decoding is dense too: its logits are
  [T, S], O(S) memory, and one dense pass over the cache beats blockwise's loop, whose fixed
  cost per key block dominates when a block holds one query (CPU, d512 8-layer model, batch 1,
  f32: 15.2 vs 18.4 ms/token at a 1k context, 29.4 vs 38.2 ms/token at 4k;
  docs/benchmarks.md). The dense pass reads the whole cache even where it is not written yet
  (q_offset is traced, so the mask cannot shrink it); blockwise skips those blocks, which pays
  only for a cache allocated far beyond its use.
  """
  del context
  block_size = default_block_size() if call.block_size is None else call.block_size
  if call.q_length <= DECODE_MAX_QUERIES or call.kv_length <= block_size:
    return None
  return (f"its [T, S] = [{call.q_length}, {call.kv_length}] logits exceed one key block of "
          f"{block_size} (quadratic memory)")


# The implementations of softmax attention. "auto" tries, per backend (`ATTENTION.preference`):
#   * CPU: "cpu", the fused C++ kernel (no bias but ALiBi, head dim a multiple of 16, a C++
#     compiler to build it with; `cpu_unsupported`). Measured on a 2-core CPU (B=1, N=8, H=64,
#     causal, f32; docs/kernels.md): fwd+bwd 2.1-2.5x faster than blockwise and 1.05-1.2x torch
#     SDPA from T = 2k to 32k (2.2x blockwise at 1k); a decode step against a 1k/4k/16k cache
#     5.6/6.1/8.8x faster than the dense reference (it skips the unwritten cache at run time).
#     "pallas" runs interpreted on the CPU, far slower than XLA's blockwise op
#     (docs/kernels.md), so "auto" never picks it there.
#   * TPU: "splash", jax's splash attention (self-attention without bias, T a multiple of 128;
#     `attention_bundled.splash_unsupported`), else "pallas", longjax's flash kernel (every mask
#     and in-kernel bias; the split-KV decode kernel for decode calls).
#   * GPU: "cudnn", `jax.nn.dot_product_attention`'s cuDNN flash kernel (bf16/f16
#     self-attention without bias or segment ids; `attention_bundled.cudnn_unsupported`), else
#     "pallas".
#   The accelerator order is the design, not a measurement: no TPU or GPU was available to time
#   these kernels; the Pallas kernels are tested interpreted and lowered for Mosaic TPU and
#   Triton in the test suite (docs/kernels.md). `impl="blockwise"` is the escape hatch.
#   * Then the XLA ops, on every backend: "reference" where `dense_passed_over` allows, else
#     "blockwise", which serves every call.
ATTENTION = dispatch.Op(
    name="attention",
    implementations=(
        dispatch.Implementation("reference", passed_over=dense_passed_over),
        dispatch.Implementation("blockwise"),
        dispatch.Implementation("pallas", unsupported=lambda c, ctx: pallas_unsupported(
            c.mask, c.bias)),
        dispatch.Implementation("cpu", unsupported=lambda c, ctx: cpu_unsupported(
            c.bias, c.q.shape[3], ctx.backend)),
        dispatch.Implementation("splash", unsupported=lambda c, ctx: (
            attention_bundled.splash_unsupported(c.mask, c.bias, q_length=c.q_length,
                                                 kv_length=c.kv_length,
                                                 return_lse=c.return_lse))),
        dispatch.Implementation("cudnn", unsupported=lambda c, ctx: (
            attention_bundled.cudnn_unsupported(c.q, c.mask, c.bias, kv_length=c.kv_length,
                                                return_lse=c.return_lse,
                                                backend=ctx.backend))),
    ),
    preference={"cpu": ("cpu", "reference", "blockwise"),
                "tpu": ("splash", "pallas", "reference", "blockwise"),
                "gpu": ("cudnn", "pallas", "reference", "blockwise")})
IMPLS = ATTENTION.choices


def resolve_call(impl: str, q, k, mask: AttentionMask, bias=None, *, block_size: int | None = None,
                 return_lse: bool = False, backend: str | None = None) -> dispatch.Resolution:
  """What `dot_product_attention` runs for this call, and why (`dispatch.resolve` on
  `ATTENTION`). q and k need only .shape and .dtype (ShapeDtypeStructs do).

  Raises:
    ValueError: for an unknown impl, or a forced kernel that cannot serve (saying why).
  """
  call = AttentionCall(q, k, mask, bias, block_size, return_lse)
  return dispatch.resolve(ATTENTION, impl, call, backend=backend)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: AttentionMask,
                        bias=None, scale: float) -> tuple[jax.Array, jax.Array]:
  """Dense attention, the plain definition; materialises [B, N, T, S] logits.

  Args:
    q: [B, T, N, H].
    k: [B, S, K, H] with N % K == 0.
    v: [B, S, K, H].
    mask: the attention mask spec.
    bias: None or a block bias (evaluated as one block).
    scale: logit scale.

  Returns:
    out [B, T, N, H] in q.dtype and lse [B, N, T] float32.
  """
  t, s = q.shape[1], k.shape[1]
  logits = softmax.grouped_logits(q, k) * scale
  if bias is not None:
    logits = logits + bias.block(0, t, 0, s)
  out, lse = softmax.masked_softmax_attention(logits, mask.dense(t, s), v)
  return out.astype(q.dtype), lse


def check_qkv(q: jax.Array, k: jax.Array, v: jax.Array, mask: AttentionMask) -> None:
  """Raises ValueError unless q [B, T, N, H], k and v [B, S, K, H] (N % K == 0, one dtype,
  T, S >= 1) and `mask` fit together."""
  common.check_qkv(q, k, v)
  mask.validate(q.shape[0], q.shape[1], k.shape[1])


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: AttentionMask,
                          bias=None, scale: float | None = None, impl: str = "auto",
                          block_size: int | None = None, return_lse: bool = False):
  """Softmax attention softmax(scale * q k^T + bias, masked) v with grouped K/V heads.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys, N % K == 0; query head n uses kv head n // (N // K).
    v: [B, S, K, H] values.
    mask: `AttentionMask` (causal / window / q_offset / segment ids).
    bias: None or a block bias such as `AlibiBias` or `T5Bias`; its floating-point arrays are
      differentiable (wrap them in `stop_gradient` to freeze them), its positions are not.
    scale: Python float multiplying q.k; None means H ** -0.5.
    impl: "auto", "reference", "blockwise", "pallas", "cpu" (the fused C++ CPU kernel),
      "splash" (jax's TPU kernel) or "cudnn" (GPU); see `ATTENTION`. A forced kernel that
      cannot serve the call raises ValueError saying why.
    block_size: block length C of the blockwise op and of the Pallas kernels (None: their
      defaults); the CPU kernel has fixed blocks sized for the caches.
    return_lse: also return the log-sum-exp of each row's scaled logits.

  Returns:
    out [B, T, N, H] in q.dtype; with `return_lse`, (out, lse) where lse is [B, N, T] float32.
    Rows with no visible key give zeros (and lse = -inf).
  """
  check_qkv(q, k, v, mask)
  h = q.shape[3]
  t, s = q.shape[1], k.shape[1]
  scale = h ** -0.5 if scale is None else float(scale)
  requested_block = block_size
  block_size = default_block_size() if block_size is None else int(block_size)
  if block_size < 1:
    raise ValueError(f"block_size must be positive, got {block_size}")
  resolution = resolve_call(impl, q, k, mask, bias, block_size=block_size,
                            return_lse=return_lse)
  logging.vlog(1, "attention T=%d S=%d: %s (%s)", t, s, resolution.impl, resolution.reason)
  cpu_reason = dict(resolution.skipped).get("cpu")
  if cpu_reason is not None and resolution.impl in ("reference", "blockwise"):
    _warn_cpu_fallback(cpu_reason, resolution.impl)
  resolved = resolution.impl
  if resolved == "cpu":
    alibi = {} if bias is None else dict(alibi_slopes=bias.slopes, q_positions=bias.q_positions,
                                         kv_positions=bias.kv_positions)
    out, lse = kernels_cpu.flash_attention(
        q, k, v, scale=scale, causal=mask.causal, window=mask.window,
        global_tokens=mask.global_tokens, landmark_block=mask.landmark_block,
        q_offset=mask.q_offset, q_segment_ids=mask.q_segment_ids,
        kv_segment_ids=mask.kv_segment_ids, **alibi)
  elif resolved == "splash":
    return attention_bundled.splash_attention(q, k, v, mask=mask, scale=scale)
  elif resolved == "cudnn":
    return attention_bundled.cudnn_attention(q, k, v, mask=mask, scale=scale)
  elif resolved == "pallas":
    if _is_decode(mask, t, s) and bias is None and mask.landmark_block is None:
      # Biased decode calls go to the flash kernel below (it takes positions, q_offset and
      # T < S, and skips the same causal tail); the decode kernel's ALiBi is index-based. So do
      # landmark masks (the decode kernel has none).
      out, lse = _pallas_decode(q, k, v, mask.q_offset, mask.window, mask.global_tokens, scale,
                                requested_block)
      return (out, lse) if return_lse else out
    out, lse = kernels_pallas.flash_attention(
        q, k, v, causal=mask.causal, window=mask.window, global_tokens=mask.global_tokens,
        landmark_block=mask.landmark_block, q_offset=mask.q_offset,
        q_segment_ids=mask.q_segment_ids, kv_segment_ids=mask.kv_segment_ids, scale=scale,
        block_q=requested_block, block_k=requested_block, return_lse=True, **_pallas_bias(bias))
  elif resolved == "reference":
    out, lse = attention_reference(q, k, v, mask=mask, bias=bias, scale=scale)
  else:
    out, lse = blockwise_attention(q, k, v, mask=mask, bias=bias, scale=scale,
                                   block_size=block_size)
  return (out, lse) if return_lse else out
