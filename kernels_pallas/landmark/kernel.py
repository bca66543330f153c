"""Landmark Attention's grouped softmax (Mohtashami & Jaggi, 2023) in Pallas, forward + backward.

The sequence is cut into blocks of `landmark_block` tokens, the last token of each block being its
landmark. Query i of block c attends (causally) to the regular tokens of its own block and to the
landmarks of earlier blocks, in one softmax (the *main* softmax); a regular token j of an earlier
block g then gets the weight  P[i, L_g] * softmax_{j' in g, not L_g}(x[i, j'])[j],  the landmark's
main probability times the within-block softmax. Landmark values are never read, and a query
never sees its own block's landmark, not even when it is that landmark. This is the authors'
`landmark_grouped_softmax` (github.com/epfml/landmark-attention, `models/landmark.py`) written
from its definition: their group ids are "landmarks strictly before the key", their last group
is {current-block keys, earlier landmarks}.

Convention: blocks have a fixed length and end with their landmark, i.e. position i is a
landmark iff (i + 1) % landmark_block == 0 and i < T (a trailing partial block has none). The
reference also takes `is_landmark` [B, T] (landmarks anywhere; a block is "everything up to and
including a landmark"), which the paper's models produce by inserting landmark tokens; the
kernels' tiling is static, so they take periodic landmarks only.

The kernels tile keys by whole blocks and run flash attention's online softmax on shifted logits
(see `landmark_tiles`); nothing [T, T] is materialised. `landmark_attention_reference` is the
dense definition, for tests.
"""

import functools
import numbers

import jax
import jax.numpy as jnp

from kernels_pallas import common
from kernels_pallas.softmax import logsumexp
from kernels_pallas.softmax import softmax
from kernels_pallas.landmark import gpu as landmark_gpu
from kernels_pallas.landmark import tiles as landmark_tiles
from kernels_pallas.landmark import tpu as landmark_tpu

_VARIANTS = {"tpu": landmark_tpu, "gpu": landmark_gpu}


def _check_inputs(q, k, v, landmark_block):
  b, t, n, h = q.shape
  if k.ndim != 4 or k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != h:
    raise ValueError(f"k and v must be [B={b}, T={t}, K, H={h}], got {k.shape} and {v.shape}")
  if n % k.shape[2]:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={k.shape[2]}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if landmark_block is not None and (not isinstance(landmark_block, numbers.Integral)
                                     or landmark_block < 2):
    raise ValueError(f"landmark_block must be an int >= 2 (a regular token and a landmark), "
                     f"got {landmark_block!r}")


def _choose_blocks(variant, interpret, length, landmark_block, block_q, block_k):
  """(Lp, block_q, block_k): the block stride in the layout and the tile sizes.

  A key tile must hold whole blocks, so block_k is a multiple of Lp. Lp = Lb unless the backend's
  tile constraints need a padded stride (Triton: powers of two; Mosaic: multiples of 8
  sublanes), which costs Lp / Lb in compute. Defaults (not tuned on hardware): key tiles of about
  64 (GPU, interpreter) or 128 (TPU) keys, query tiles of 64 (GPU, interpreter) or 256 (TPU).
  """
  if block_k is not None:
    if block_k < landmark_block:
      raise ValueError(f"block_k={block_k} must be >= landmark_block={landmark_block}: a key "
                       f"tile holds whole landmark blocks (blocks spanning tiles are not "
                       f"implemented)")
    lp = min(d for d in range(landmark_block, block_k + 1) if block_k % d == 0)
    bk = block_k
  else:
    if interpret:
      lp = landmark_block
    elif variant == "gpu":
      lp = common.next_power_of_2(landmark_block)
    else:
      lp = common.cdiv(landmark_block, 8) * 8
    per_tile = max(1, common.cdiv(64 if interpret or variant == "gpu" else 128, lp))
    blocks = common.cdiv(length, landmark_block)  # no wider than the (padded) sequence
    bk = lp * min(per_tile, common.next_power_of_2(blocks))
    if not interpret and variant == "gpu":
      bk = max(bk, 16)
  laid = common.cdiv(length, landmark_block) * lp
  if block_q is None:
    block_q = 256 if variant == "tpu" and not interpret else 64
    unit = 1 if interpret else 8 if variant == "tpu" else 16
    small = common.cdiv(laid, unit) * unit if variant == "tpu" or interpret else max(
        16, common.next_power_of_2(laid))
    block_q = min(block_q, small)
  if block_q < 1:
    raise ValueError(f"block_q must be positive, got {block_q}")
  if not interpret:
    if variant == "tpu" and (block_q % 8 or bk % 8):
      raise ValueError(f"the TPU kernels need block_q and block_k multiples of 8, got "
                       f"block_q={block_q}, block_k={bk}")
    if variant == "gpu" and any(x < 16 or x & (x - 1) for x in (block_q, bk)):
      raise ValueError(f"the GPU (Triton) kernels need power-of-two tiles >= 16, got "
                       f"block_q={block_q}, block_k={bk}")
  return lp, int(block_q), int(bk)


def _to_layout(x, landmark_block, lp, multiple):
  """[B, T, ...] -> [B, Tl, ...]: block b at [b * Lp, b * Lp + Lb), zero-padded to `multiple`."""
  b = x.shape[0]
  x = common.pad_to_multiple(x, 1, landmark_block)
  if lp != landmark_block:
    blocks = x.reshape(b, -1, landmark_block, *x.shape[2:])
    widths = [(0, 0)] * blocks.ndim
    widths[2] = (0, lp - landmark_block)
    x = jnp.pad(blocks, widths).reshape(b, -1, *x.shape[2:])
  return common.pad_to_multiple(x, 1, multiple)


def _from_layout(y, t, landmark_block, lp):
  """Inverse of `_to_layout` for [B, Tl, ...] -> [B, T, ...]."""
  b = y.shape[0]
  y = y[:, :common.cdiv(t, landmark_block) * lp]
  if lp != landmark_block:
    rest = y.shape[2:]
    y = y.reshape(b, -1, lp, *rest)[:, :, :landmark_block].reshape(b, -1, *rest)
  return y[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _landmark(spec, variant, interpret, q, k, v, q_ids, kv_ids):
  """Head-major layout attention: q [B, N, Tp, H], k/v [B, K, Sp, H] -> (out, lse [B, N, Tp]);
  q_ids [B, Tp], kv_ids [B, Sp] int32 segment ids or None."""
  return _VARIANTS[variant].forward(spec, q, k, v, q_ids, kv_ids, interpret=interpret)


def _landmark_fwd(spec, variant, interpret, q, k, v, q_ids, kv_ids):
  out, lse = _landmark(spec, variant, interpret, q, k, v, q_ids, kv_ids)
  return (out, lse), (q, k, v, q_ids, kv_ids, out, lse)


def _landmark_bwd(spec, variant, interpret, residuals, cotangents):
  q, k, v, q_ids, kv_ids, out, lse = residuals
  dout, dlse = cotangents
  # As in flash attention: D = rowsum(dO * O), and a cotangent on lse lowers D by it (d lse /
  # d logits is the main softmax's weight on each shifted logit).
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1) - dlse
  # Padding rows may see nothing (lse = -inf); any finite value keeps their weights at 0.
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  dq, dk, dv = _VARIANTS[variant].backward(spec, q, k, v, dout.astype(q.dtype), lse, delta,
                                           q_ids, kv_ids, interpret=interpret)
  return dq, dk, dv, None, None


_landmark.defvjp(_landmark_fwd, _landmark_bwd)


def landmark_attention(q, k, v, *, landmark_block: int, segment_ids=None,
                       scale: float | None = None, block_q: int | None = None,
                       block_k: int | None = None, interpret: bool | None = None,
                       backend: str | None = None, return_lse: bool = False):
  """Causal landmark attention with the grouped softmax, in Pallas (see the module docstring).

  Args:
    q: [B, T, N, H] queries.
    k: [B, T, K, H] keys, N % K == 0 (query head n reads KV head n // (N // K)).
    v: [B, T, K, H] values (same dtype as q and k).
    landmark_block: Lb >= 2, tokens per block including its landmark (the paper's mem_freq + 1);
      landmarks sit at (i + 1) % Lb == 0 (the kernels tile keys by whole blocks, so arbitrary
      landmark positions are `landmark_attention_reference`'s alone).
    segment_ids: [B, T] int documents of a packed row, or None. A query sees keys of its own
      document only: its block's, and an earlier block's regular keys through that block's
      landmark when the landmark is of its document too. A landmark is expected to share the
      document of a regular key of its block, as `longjax.ops.landmarks` lays them out (the
      token before it); otherwise the kernels skip it, where the reference would give its
      weight to no key.
    scale: multiplies q.k; None means H ** -0.5.
    block_q: query rows per tile; None picks a default.
    block_k: keys per tile, >= landmark_block; the layout pads each block to the smallest divisor
      of block_k that is >= landmark_block. None picks a default.
    interpret: run the Pallas interpreter; None means only on CPU.
    backend: kernel variant override, "tpu" or "gpu"; None picks by backend.
    return_lse: also return the main softmax's log-sum-exp [B, N, T] f32.

  Returns:
    out [B, T, N, H] in q.dtype (and lse with `return_lse`).
  """
  if landmark_block is None:
    raise ValueError("landmark_block must be an int >= 2, got None")
  _check_inputs(q, k, v, landmark_block)
  b, t, n, h = q.shape
  variant = common.kernel_variant(backend)
  interpret = common.default_interpret() if interpret is None else bool(interpret)
  lp, bq, bk = _choose_blocks(variant, interpret, t, landmark_block, block_q, block_k)
  spec = landmark_tiles.LandmarkSpec(
      landmark_block=int(landmark_block), block_pad=lp, length=t, block_q=bq, block_k=bk,
      scale=h ** -0.5 if scale is None else float(scale),
      has_segments=segment_ids is not None)
  q_ids = kv_ids = None
  if segment_ids is not None:
    if segment_ids.shape != (b, t):
      raise ValueError(f"segment_ids must be [B={b}, T={t}], got {segment_ids.shape}")
    ids = jnp.asarray(segment_ids, jnp.int32)
    q_ids, kv_ids = (_to_layout(ids, landmark_block, lp, m) for m in (bq, bk))

  def head_major(x, multiple):
    x = _to_layout(x, landmark_block, lp, multiple).transpose(0, 2, 1, 3)
    if variant == "gpu":  # Triton tiles need power-of-two widths; zero features change nothing
      x = common.pad_to_multiple(x, 3, max(16, common.next_power_of_2(h)))
    return x

  out, lse = _landmark(spec, variant, interpret, head_major(q, bq), head_major(k, bk),
                       head_major(v, bk), q_ids, kv_ids)
  out = _from_layout(out[..., :h].transpose(0, 2, 1, 3), t, landmark_block, lp)
  if not return_lse:
    return out
  return out, _from_layout(lse.transpose(0, 2, 1), t, landmark_block, lp).transpose(0, 2, 1)


def landmark_weights_reference(logits, is_landmark):
  """Dense grouped-softmax weights P [B, N, T, T] and main lse [B, N, T] from f32 logits.

  Group ids are the number of landmarks strictly before each position (so a landmark belongs to
  the block it closes); within-block softmaxes are segment reductions over those ids.
  """
  t = logits.shape[-1]
  pos = jnp.arange(t)

  def one(x, lm):  # x [N, T, S], lm [S] bool
    gid = jnp.cumsum(lm) - lm
    same = gid[:, None] == gid[None, :]
    current = (pos[:, None] >= pos[None, :]) & same & ~lm[None, :]
    earlier = gid[None, :] < gid[:, None]
    main = jnp.where(current | (earlier & lm[None, :]), x, -jnp.inf)
    p_main, lse = softmax(main), logsumexp(main)
    # Within-block softmax of the regular keys of earlier blocks, keys on the leading axis.
    xr = jnp.moveaxis(jnp.where(earlier & ~lm[None, :], x, -jnp.inf), -1, 0)  # [S, N, T]
    group_max = jax.lax.stop_gradient(jax.ops.segment_max(xr, gid, num_segments=t))
    group_max = jnp.where(jnp.isfinite(group_max), group_max, 0.0)
    e = jnp.exp(xr - group_max[gid])
    total = jax.ops.segment_sum(e, gid, num_segments=t)
    within = e / jnp.where(total > 0, total, 1.0)[gid]
    # The main probability of each block's landmark, handed to its regular keys.
    p_landmark = jax.ops.segment_sum(jnp.moveaxis(jnp.where(lm[None, :], p_main, 0.0), -1, 0),
                                     gid, num_segments=t)
    earlier_weights = jnp.moveaxis(within * p_landmark[gid], 0, -1)
    return jnp.where(current, p_main, 0.0) + earlier_weights, lse

  return jax.vmap(one)(logits, is_landmark)


def landmark_attention_reference(q, k, v, *, landmark_block: int | None = None, is_landmark=None,
                                 segment_ids=None, scale: float | None = None,
                                 return_lse: bool = False):
  """Dense landmark attention: materialises [B, N, T, T] weights. For tests.

  Args:
    q: [B, T, N, H]; k, v: [B, T, K, H], N % K == 0.
    landmark_block: periodic landmarks at (i + 1) % landmark_block == 0 (when is_landmark is None).
    is_landmark: [B, T] bool, landmarks at arbitrary positions (overrides landmark_block).
    segment_ids: [B, T] int documents, or None: a query's logits to other documents' keys
      are masked, which drops them from every softmax (a landmark of another document included).
    scale: multiplies q.k; None means H ** -0.5.
    return_lse: also return the main softmax's log-sum-exp [B, N, T] f32.

  Returns:
    out [B, T, N, H] in q.dtype (and lse with `return_lse`).
  """
  _check_inputs(q, k, v, landmark_block)
  b, t, n, h = q.shape
  nk = k.shape[2]
  if is_landmark is None:
    if landmark_block is None:
      raise ValueError("give landmark_block or is_landmark")
    is_landmark = jnp.broadcast_to((jnp.arange(t) + 1) % landmark_block == 0, (b, t))
  is_landmark = jnp.asarray(is_landmark, bool)
  scale = h ** -0.5 if scale is None else float(scale)
  logits = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, nk, n // nk, h), k,
                      preferred_element_type=jnp.float32).reshape(b, n, t, t) * scale
  if segment_ids is not None:
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    logits = jnp.where(same, logits, -jnp.inf)
  p, lse = landmark_weights_reference(logits, is_landmark)
  p = p.astype(v.dtype).reshape(b, nk, n // nk, t, t)
  out = jnp.einsum("bkgts,bskh->btkgh", p, v, preferred_element_type=jnp.float32)
  out = out.reshape(b, t, n, h).astype(q.dtype)
  return (out, lse) if return_lse else out

