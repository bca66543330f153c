"""Flash attention (FlashAttention-2) in Pallas: forward, backward kernels and the dense reference.

`flash_attention` takes queries [B, T, N, H] and grouped keys/values [B, S, K, H] (query head n
reads KV head n // (N // K), never a repeated copy), evaluates masks and biases inside the
kernels from a small static spec (see `block_mask` for the exact semantics), skips KV blocks that
no query of a block can see (neither copied nor computed), and returns the output and optionally
the log-sum-exp of each row, which ring attention and decoding need to merge partial results.
Position-based biases (ALiBi, KERPLE, T5 buckets, FIRE) are computed per tile from per-token
positions (or the indices) and their parameters (T5's bucket table by selects over the runs of
equal buckets, FIRE's MLP one hidden unit at a time), with the parameters' gradients summed from
per-row shares.
The backward pass is two Pallas kernels (dq; dk and dv summed over each KV head's query heads)
that recompute the probabilities from the saved log-sum-exp.

Two kernel variants share the tile maths (`flash_tiles`): `flash_attention_tpu` (Mosaic: a
grid axis over the visited KV blocks, scratch accumulators) and `flash_attention_gpu` (Triton:
loops over the visited blocks inside each program). `common.kernel_variant` picks one by backend;
both run in interpret mode on CPU.

`flash_attention_reference` is the plain dense definition, for tests.
"""

import functools
import numbers

import jax
import jax.numpy as jnp

from kernels_pallas import block_mask
from kernels_pallas import common
from kernels_pallas.flash import gpu as flash_attention_gpu
from kernels_pallas.flash import tpu as flash_attention_tpu
from kernels_pallas.flash import tiles as flash_tiles
from kernels_pallas import softmax
from kernels_pallas.t5_buckets import t5_bucket_table

_VARIANTS = {"tpu": flash_attention_tpu, "gpu": flash_attention_gpu}


# The bias kinds: the distance biases of `block_mask` ([N] parameter arrays), T5 (a
# [num_buckets, N] table) and FIRE (six arrays); see `_bias_args`.
BIAS_KINDS = (*block_mask.BIAS_KINDS, "t5", "fire")
# FIRE's parameters in order: the fields of `longjax.posenc.FireParams`.
_FIRE_FIELDS = ("c", "threshold", "w1", "b1", "w2", "b2")


def _bias_args(n, bias_kind, bias_params, alibi_slopes):
  """Normalises the bias arguments to (kind or None, tuple of f32 parameter arrays).

  The arrays are [N] each for the distance biases, ([num_buckets, N],) for "t5", and
  (c [], threshold [], w1 [F], b1 [F], w2 [F, N], b2 [N]) for "fire".
  """
  if alibi_slopes is not None:
    if bias_kind is not None or bias_params is not None:
      raise ValueError("give alibi_slopes or bias_kind/bias_params, not both")
    bias_kind, bias_params = "alibi", alibi_slopes
  if bias_kind is None:
    if bias_params is not None:
      raise ValueError("bias_params needs a bias_kind")
    return None, ()
  if bias_kind not in BIAS_KINDS:
    raise ValueError(f"bias_kind={bias_kind!r}; valid: {BIAS_KINDS} or None")
  if bias_params is None:
    raise ValueError(f"bias_kind={bias_kind!r} needs bias_params")
  num = {"t5": 1, "fire": len(_FIRE_FIELDS)}.get(bias_kind) or block_mask.BIAS_KINDS[bias_kind]
  if num == 1 and not isinstance(bias_params, (tuple, list)):
    bias_params = (bias_params,)
  if not isinstance(bias_params, (tuple, list)) or len(bias_params) != num:
    what = {"t5": f"(table [num_buckets, N={n}],)",
            "fire": f"{_FIRE_FIELDS} (shapes [], [], [F], [F], [F, N={n}], [N])"}
    raise ValueError(f"bias_kind={bias_kind!r} takes bias_params = "
                     f"{what.get(bias_kind, f'{num} arrays [N={n}]')}")
  params = tuple(jnp.asarray(x, jnp.float32) for x in bias_params)
  if bias_kind == "t5":
    shapes = ((params[0].shape[0], n),) if params[0].ndim == 2 else ((None, n),)
  elif bias_kind == "fire":
    f = params[2].shape[0] if params[2].ndim == 1 else -1
    shapes = ((), (), (f,), (f,), (f, n), (n,))
  else:
    shapes = ((n,),) * num
  for x, shape in zip(params, shapes):
    if x.shape != shape:
      raise ValueError(f"bias_kind={bias_kind!r}: parameter shapes must be {shapes} (N={n}), "
                       f"got {tuple(x.shape for x in params)}")
  return bias_kind, params


def _pack_params(bias_kind, params, n):
  """The kernels' head-major [N * P] parameter array (`block_mask.FlashSpec`).

  FIRE's shared parameters are repeated for every head, so each head's P values are contiguous;
  autodiff of this packing sums their per-head gradients.
  """
  if bias_kind == "t5":
    per_head = params[0].T  # [N, num_buckets]
  elif bias_kind == "fire":
    c, threshold, w1, b1, w2, b2 = params
    per_head = jnp.concatenate(
        [jnp.broadcast_to(c, (n, 1)), jnp.broadcast_to(threshold, (n, 1)),
         jnp.broadcast_to(w1, (n, w1.shape[0])), jnp.broadcast_to(b1, (n, b1.shape[0])),
         w2.T, b2[:, None]], axis=1)  # [N, 3F + 3]
  else:
    per_head = jnp.stack(params, axis=1)  # [N, P]
  return per_head.reshape(-1)


def _t5_runs(num_buckets: int, max_distance: int, bidirectional: bool) -> tuple:
  """((first distance, bucket), ...) of each run of equal buckets in `t5_bucket_table`."""
  table = t5_bucket_table(num_buckets, max_distance, bidirectional)
  return tuple((d - max_distance, int(b)) for d, b in enumerate(table)
               if d == 0 or b != table[d - 1])


def _check_inputs(q, k, v, window, global_tokens, q_segment_ids, kv_segment_ids, q_positions,
                  kv_positions, logit_soft_cap):
  common.check_qkv(q, k, v)
  b, t, n, h = q.shape
  if window is not None and (not isinstance(window, numbers.Integral) or window < 1):
    raise ValueError(f"window must be a positive int or None, got {window!r}")
  if not isinstance(global_tokens, numbers.Integral) or global_tokens < 0:
    raise ValueError(f"global_tokens must be an int >= 0, got {global_tokens!r}")
  if global_tokens and window is None:
    raise ValueError(f"global_tokens={global_tokens} needs a window")
  # Per-token arrays come in (query, key) pairs, each [B or 1, length].
  for kind, q_side, kv_side in (("segment_ids", q_segment_ids, kv_segment_ids),
                                ("positions", q_positions, kv_positions)):
    if (q_side is None) != (kv_side is None):
      raise ValueError(f"q_{kind} and kv_{kind} must be given together")
    if q_side is None:
      continue
    for name, x, length in ((f"q_{kind}", q_side, t), (f"kv_{kind}", kv_side, k.shape[1])):
      if x.ndim != 2 or x.shape[1] != length or x.shape[0] not in (1, b):
        raise ValueError(f"{name} must have shape [{b} or 1, {length}], got {x.shape}")
  if logit_soft_cap is not None and not logit_soft_cap > 0:
    raise ValueError(f"logit_soft_cap must be positive or None, got {logit_soft_cap!r}")


def _check_landmark(landmark_block, causal) -> None:
  if landmark_block is None:
    return
  if not isinstance(landmark_block, numbers.Integral) or landmark_block < 2:
    raise ValueError("landmark_block must be an int >= 2 (a regular token and its landmark) or "
                     f"None, got {landmark_block!r}")
  if not causal:
    raise ValueError(f"landmark_block={landmark_block} needs causal=True")


def _check_blocks(variant: str, interpret: bool, block_q: int, block_k: int) -> None:
  if block_q < 1 or block_k < 1:
    raise ValueError(f"block sizes must be positive, got {block_q}, {block_k}")
  if interpret:
    return  # the interpreter takes any block shape
  if variant == "tpu" and (block_q % 8 or block_k % 128):
    raise ValueError(f"the TPU kernels need block_q % 8 == 0 and block_k % 128 == 0 (vreg "
                     f"tiles), got block_q={block_q}, block_k={block_k}")
  if variant == "gpu" and any(x < 16 or x & (x - 1) for x in (block_q, block_k)):
    raise ValueError(f"the GPU (Triton) kernels need power-of-two blocks >= 16, got "
                     f"block_q={block_q}, block_k={block_k}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(spec, variant, interpret, q, k, v, q_offset, params, q_ids, kv_ids, q_pos,
               kv_pos):
  """Padded head-major attention: q [B, N, Tp, H], k/v [B, K, Sp, H] -> (out, lse [B, N, Tp]).

  params: [N * P] f32 bias parameters, head-major, or None; q_ids/q_pos [B, Tp] and
  kv_ids/kv_pos [B, Sp] int32 or None.
  """
  return _VARIANTS[variant].forward(spec, q, k, v, q_offset, params, q_ids, kv_ids, q_pos,
                                    kv_pos, interpret=interpret)


def _attention_fwd(spec, variant, interpret, q, k, v, q_offset, params, q_ids, kv_ids, q_pos,
                   kv_pos):
  out, lse = _attention(spec, variant, interpret, q, k, v, q_offset, params, q_ids, kv_ids,
                        q_pos, kv_pos)
  return (out, lse), (q, k, v, q_offset, params, q_ids, kv_ids, q_pos, kv_pos, out, lse)


def _attention_bwd(spec, variant, interpret, residuals, cotangents):
  q, k, v, q_offset, params, q_ids, kv_ids, q_pos, kv_pos, out, lse = residuals
  dout, dlse = cotangents
  # FlashAttention-2's D = rowsum(dO * O). A cotangent on lse adds p * dlse to d(logits), the
  # same as lowering D by dlse.
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - dlse
  # Rows that saw no key have lse = -inf and no visible logit; any finite value keeps their
  # p = exp(-inf - lse) at 0 instead of NaN.
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  dq, dk, dv, dparams = _VARIANTS[variant].backward(
      spec, q, k, v, q_offset, params, q_ids, kv_ids, q_pos, kv_pos, dout.astype(q.dtype), lse,
      delta, interpret=interpret)
  if dparams is not None:  # per-row shares [B, N, Tp, P]; padded rows saw no key and hold 0
    dparams = dparams.sum(axis=(0, 2)).reshape(-1).astype(params.dtype)
  return dq, dk, dv, None, dparams, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, *, causal: bool = True, window: int | None = None,
                    global_tokens: int = 0, landmark_block: int | None = None, q_offset=0,
                    q_segment_ids=None, kv_segment_ids=None,
                    bias_kind: str | None = None, bias_params=None, q_positions=None,
                    kv_positions=None, t5_max_distance: int = 128,
                    t5_bidirectional: bool = False, alibi_slopes=None,
                    logit_soft_cap: float | None = None,
                    scale: float | None = None, block_q: int | None = None,
                    block_k: int | None = None, return_lse: bool = False,
                    interpret: bool | None = None, backend: str | None = None):
  """Softmax attention softmax(logits, masked) v with in-kernel masks and biases.

  Logits are scale * q.k, then soft-capped, then biased by a function of the positions p_q, p_k
  (per-token positions, or indices when no positions are given); query row t sits at
  absolute index i = t + q_offset and sees key j as described in `block_mask` (causal, window,
  global tokens, segment ids: masks always use indices). Rows that see no key output zeros and
  lse = -inf, with zero gradients.

  Args:
    q: [B, T, N, H] queries.
    k: [B, S, K, H] keys, N % K == 0.
    v: [B, S, K, H] values (same dtype as q and k).
    causal: hide keys j > i.
    window: sliding window w: keys with i - j >= w are hidden (|i - j| >= w when not causal).
    global_tokens: keys j < global_tokens are exempt from the window (LM-Infinite / sinks).
    landmark_block: L >= 2 (needs `causal`): Landmark Attention's main softmax; keys j with
      (j + 1) % L == 0 are landmarks and query i sees only its own block's non-landmark keys and the
      landmarks of earlier blocks (see `block_mask`). Every key tile of width >= L holds a
      landmark, so this visits the causal range.
    q_offset: int or int32 scalar (may be traced): absolute index of query row 0, e.g. the
      number of tokens already in a KV cache when decoding.
    q_segment_ids: [B or 1, T] int ids; only equal ids attend (packed documents).
    kv_segment_ids: [B or 1, S] int ids.
    bias_kind: None or, with d = |p_q - p_k|, "alibi" (logits -= slope[n] * d), "kerple_log"
      (logits -= r1[n] * log(1 + r2[n] * d)), "kerple_power" (logits -= r1[n] * d ** r2[n], 0
      at d = 0), "t5" (logits += table[bucket(p_q - p_k), n], T5's buckets: `t5_bucket_table`)
      or "fire" (logits += f(x)[n], x = log(1 + c d) / (log(1 + c max(L, p_q)) + 1e-6), f(x) =
      w2^T relu(w1 x + b1) + b2), as `longjax.ops.biases.AlibiBias` / `KerpleBias` / `T5Bias`
      / `FireBias`. All are computed per tile, never as a [T, S] array.
    bias_params: the bias's parameters, all differentiable (the dq kernel also sums each row's
      d(logits) * d(bias)/d(parameter)): [N] slopes (or a 1-tuple) for "alibi"; ([N] r1, [N] r2)
      for KERPLE (r2 > 0); the table [num_buckets, N] (or a 1-tuple) for "t5"; (c [], L [],
      w1 [F], b1 [F], w2 [F, N], b2 [N]) for "fire" (c, L > 0; a `FireParams` fits).
    q_positions: [B or 1, T] int positions of the queries for the bias (e.g. shifted, or
      restarted per packed document); None (with kv_positions None) means i = t + q_offset.
    kv_positions: [B or 1, S] int positions of the keys; None means j.
    t5_max_distance: "t5": distances at or beyond it share the last bucket (of their direction).
    t5_bidirectional: "t5": keys after the query get their own half of the buckets (else they
      share bucket 0 with distance 0).
    alibi_slopes: shorthand for bias_kind="alibi", bias_params=alibi_slopes.
    logit_soft_cap: c: logits = c * tanh(logits / c) (before the bias).
    scale: multiplies q.k; None means H ** -0.5.
    block_q: query rows per block; None picks `common.default_block_sizes`.
    block_k: keys per block; None as above.
    return_lse: also return the log-sum-exp of each row's logits.
    interpret: run the Pallas interpreter; None means only on CPU.
    backend: kernel variant override, "tpu" or "gpu"; None picks by backend (tests use it to
      run both variants in the interpreter).

  Returns:
    out [B, T, N, H] in q.dtype; with `return_lse`, (out, lse) with lse [B, N, T] float32.
  """
  _check_inputs(q, k, v, window, global_tokens, q_segment_ids, kv_segment_ids, q_positions,
                kv_positions, logit_soft_cap)
  _check_landmark(landmark_block, causal)
  b, t, n, h = q.shape
  s = k.shape[1]
  bias_kind, params = _bias_args(n, bias_kind, bias_params, alibi_slopes)
  has_positions = bias_kind is not None and q_positions is not None
  variant = common.kernel_variant(backend)
  interpret = common.default_interpret() if interpret is None else bool(interpret)
  default_q, default_k = common.default_block_sizes(variant, t, s)
  block_q = default_q if block_q is None else int(block_q)
  block_k = default_k if block_k is None else int(block_k)
  _check_blocks(variant, interpret, block_q, block_k)
  # [N * P], head-major: head n's parameters are packed[n * P: (n + 1) * P].
  packed = _pack_params(bias_kind, params, n) if params else None
  t5_runs = ()
  if bias_kind == "t5":
    t5_runs = _t5_runs(params[0].shape[0], int(t5_max_distance), bool(t5_bidirectional))
  spec = block_mask.FlashSpec(
      causal=bool(causal), window=window, global_tokens=global_tokens,
      landmark_block=landmark_block, q_length=t, kv_length=s,
      block_q=block_q, block_k=block_k, scale=h ** -0.5 if scale is None else float(scale),
      soft_cap=None if logit_soft_cap is None else float(logit_soft_cap),
      bias=bias_kind, has_segments=q_segment_ids is not None, has_positions=has_positions,
      bias_size=0 if packed is None else packed.shape[0] // n, t5_runs=t5_runs,
      fire_hidden=params[2].shape[0] if bias_kind == "fire" else 0)

  # Head-major layout: a (block, H) tile of one head is then contiguous in its last two dims,
  # which Mosaic's (8, 128) tiling needs; the transposes are O(T N H) next to O(T S N H).
  def head_major(x, block):
    return common.pad_to_multiple(x, 1, block).transpose(0, 2, 1, 3)

  qh, kh, vh = head_major(q, block_q), head_major(k, block_k), head_major(v, block_k)
  if variant == "gpu":
    # Triton tiles need power-of-two sizes; zero features change neither q.k nor p v.
    width = max(16, common.next_power_of_2(h))
    qh, kh, vh = (common.pad_to_multiple(x, 3, width) for x in (qh, kh, vh))
  offset = jnp.asarray(q_offset, jnp.int32).reshape(1)

  def per_token(x, length, block):  # [B or 1, L] -> [B, Lp] int32; padding is masked
    return common.pad_to_multiple(
        jnp.broadcast_to(jnp.asarray(x, jnp.int32), (b, length)), 1, block)

  q_ids = kv_ids = q_pos = kv_pos = None
  if q_segment_ids is not None:
    q_ids, kv_ids = per_token(q_segment_ids, t, block_q), per_token(kv_segment_ids, s, block_k)
  if has_positions:
    q_pos, kv_pos = per_token(q_positions, t, block_q), per_token(kv_positions, s, block_k)
  out, lse = _attention(spec, variant, interpret, qh, kh, vh, offset, packed, q_ids, kv_ids,
                        q_pos, kv_pos)
  out = out[:, :, :t, :h].transpose(0, 2, 1, 3)
  return (out, lse[:, :, :t]) if return_lse else out


def _reference_bias(bias_kind, params, rel, q_pos, t5_max_distance, t5_bidirectional):
  """The dense bias f32 [B or 1, N, T, S] from the signed distances rel = p_q - p_k [B or 1, T, S]
  and the query positions q_pos [B or 1, T] (int32), written as `longjax.posenc.relative_bias`
  writes it (the same jnp operations, so T5 is bit-identical)."""
  if bias_kind == "t5":
    max_distance = int(t5_max_distance)
    lookup = jnp.asarray(t5_bucket_table(params[0].shape[0], max_distance,
                                         bool(t5_bidirectional)))
    # [N, 2 * max_distance + 1]: the table gathered once per distance, then per (query, key).
    per_distance = jnp.take(params[0], lookup, axis=0, mode="clip").T
    clipped = jnp.clip(rel, -max_distance, max_distance)
    return jnp.moveaxis(jnp.take(per_distance, clipped + max_distance, axis=1, mode="clip"), 0, 1)
  d = jnp.abs(rel).astype(jnp.float32)
  if bias_kind == "fire":
    c, threshold, w1, b1, w2, b2 = params
    normaliser = jnp.log1p(c * jnp.maximum(threshold, q_pos.astype(jnp.float32))) + \
        flash_tiles.FIRE_EPS
    x = jnp.log1p(c * d) / normaliser[:, :, None]
    hidden = jax.nn.relu(x[..., None] * w1 + b1)  # [B or 1, T, S, F]
    return jnp.einsum("btsf,fn->bnts", hidden, w2) + b2[None, :, None, None]
  d = d[:, None]  # [B or 1, 1, T, S]
  p1 = params[0][:, None, None]  # [N, 1, 1]
  if bias_kind == "alibi":
    return -p1 * d
  if bias_kind == "kerple_log":
    return -p1 * jnp.log1p(params[1][:, None, None] * d)
  # kerple_power; d = 0 apart, so that the gradient of 0 ** r2 is not 0 * log(0)
  log_d = jnp.log(jnp.where(d > 0, d, 1.0))
  return -p1 * jnp.where(d > 0, jnp.exp(params[1][:, None, None] * log_d), 0.0)


def flash_attention_reference(q, k, v, *, causal: bool = True, window: int | None = None,
                              global_tokens: int = 0, landmark_block: int | None = None,
                              q_offset=0, q_segment_ids=None,
                              kv_segment_ids=None, bias_kind: str | None = None,
                              bias_params=None, q_positions=None, kv_positions=None,
                              t5_max_distance: int = 128, t5_bidirectional: bool = False,
                              alibi_slopes=None, logit_soft_cap: float | None = None,
                              scale: float | None = None, return_lse: bool = False):
  """Dense attention with the semantics of `flash_attention`; materialises [B, N, T, S] logits.

  Args: as for `flash_attention` (without block sizes, interpreter or variant).

  Returns:
    out [B, T, N, H] in q.dtype; with `return_lse`, (out, lse [B, N, T] float32).
  """
  _check_inputs(q, k, v, window, global_tokens, q_segment_ids, kv_segment_ids, q_positions,
                kv_positions, logit_soft_cap)
  _check_landmark(landmark_block, causal)
  _, t, n, h = q.shape
  s = k.shape[1]
  bias_kind, params = _bias_args(n, bias_kind, bias_params, alibi_slopes)
  scale = h ** -0.5 if scale is None else float(scale)
  logits = softmax.grouped_logits(q, k) * scale
  if logit_soft_cap is not None:
    logits = logit_soft_cap * jnp.tanh(logits / logit_soft_cap)
  distance = (jnp.arange(t)[:, None] + jnp.asarray(q_offset, jnp.int32)) - jnp.arange(s)[None]
  if bias_kind is not None:
    if q_positions is None:
      rel = distance[None]  # [1, T, S]
      q_pos = (jnp.arange(t) + jnp.asarray(q_offset, jnp.int32))[None]  # [1, T]
    else:
      q_pos = jnp.asarray(q_positions, jnp.int32)
      rel = q_pos[:, :, None] - jnp.asarray(kv_positions, jnp.int32)[:, None, :]  # [B or 1, T, S]
    logits = logits + _reference_bias(bias_kind, params, rel, q_pos, t5_max_distance,
                                      t5_bidirectional)
  visible = jnp.ones((t, s), bool)
  if causal:
    visible &= distance >= 0
  if window is not None:
    near = (distance < window) if causal else (jnp.abs(distance) < window)
    if global_tokens:
      near |= jnp.arange(s)[None] < global_tokens
    visible &= near
  if landmark_block is not None:
    i = jnp.arange(t)[:, None] + jnp.asarray(q_offset, jnp.int32)
    j = jnp.arange(s)[None]
    is_landmark = (j + 1) % landmark_block == 0
    visible &= jnp.where(is_landmark, j // landmark_block < i // landmark_block,
                         j // landmark_block == i // landmark_block)
  visible = visible[None, None]
  if q_segment_ids is not None:
    visible = visible & (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
  out, lse = softmax.masked_softmax_attention(logits, visible, v)
  out = out.astype(q.dtype)
  return (out, lse) if return_lse else out
