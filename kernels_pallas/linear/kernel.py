"""Chunked causal linear attention (Lightning Attention-2 tiling) with optional scalar decay.

The recurrence, per batch and head, with a per-step decay a_t = exp(log_decay_t):

  S_t = a_t S_{t-1} + k_t^T v_t        (S_0 = initial_state, [Dk, Dv])
  o_t = scale * q_t S_t

i.e. o_t = scale * (sum_{s<=t} (prod_{r=s+1..t} a_r) (q_t . k_s) v_s + (prod_{r<=t} a_r) q_t S_0).
The decay is absent (a = 1: plain linear attention), constant per head (RetNet, Lightning
Attention, TransNormer), per step and head (Mamba-2 SSD's scalar decay) or per step, head and key
channel (GLA: S_t = diag(a_t) S_{t-1} + k_t^T v_t, a_t [Dk]; within a chunk the scores are then a
masked [C, C, Dk] product, see `tiles`, and chunks default to 16 steps).

`linear_attention` tiles time into chunks: within a chunk the masked quadratic form, between
chunks the [Dk, Dv] state, decayed and passed on (the maths is in `linear_attention_tiles`). Its
backward pass is two Pallas kernels, dq forwards in time (rebuilding the states) and dk/dv
backwards (carrying the state cotangent, which starts at the final state's cotangent and ends as
the initial state's gradient). The decay gradient needs no kernel of its own: with G_t the
cumulative log decay, the loss depends on G only through q_t e^{G_t}, k_t e^{-G_t} and the final
state's factor e^{G_T}, so dL/dG_t = q_t . dq_t - k_t . dk_t (+ <dS_T, S_T> at t = T), and
dL/dlog_decay_r is its reverse cumulative sum: O(T N Dk) elementwise work on the kernels' f32
dq and dk (Mamba-2's trick). Per channel the same holds channel by channel, without the sum
over d (and <dS_T, S_T> summed over values only).

Two kernel variants share the chunk maths: `linear_attention_tpu` (Mosaic: a sequential grid axis
over chunks, the state in VMEM scratch) and `linear_attention_gpu` (Triton: a loop over chunks
inside each program). `linear_attention_reference` (quadratic masked form) and
`linear_attention_recurrent` (a scan over time) are independent definitions, for tests.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import common
from kernels_pallas.linear import gpu as linear_attention_gpu
from kernels_pallas.linear import tpu as linear_attention_tpu
from kernels_pallas.linear.tiles import LinearSpec

_VARIANTS = {"tpu": linear_attention_tpu, "gpu": linear_attention_gpu}


def _check_inputs(q, k, v, log_decay, initial_state):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be 4-D, got {q.shape}, {k.shape}, {v.shape}")
  b, t, n, dk = q.shape
  if k.shape[:2] != (b, t) or k.shape[3] != dk or v.shape[:3] != k.shape[:3]:
    raise ValueError(f"k must be [B={b}, T={t}, K, Dk={dk}] and v [B, T, K, Dv], got "
                     f"{k.shape} and {v.shape}")
  if n % k.shape[2]:
    raise ValueError(f"query heads N={n} must be a multiple of key/value heads K={k.shape[2]}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if t < 1:
    raise ValueError("empty sequences are not supported")
  if log_decay is not None and jnp.shape(log_decay) not in ((n,), (b, t, n), (b, t, n, dk)):
    raise ValueError(f"log_decay must be [N={n}], [B={b}, T={t}, N={n}] or [B, T, N, Dk={dk}], "
                     f"got {jnp.shape(log_decay)}")
  if initial_state is not None and jnp.shape(initial_state) != (b, n, dk, v.shape[3]):
    raise ValueError(f"initial_state must be [B={b}, N={n}, Dk={dk}, Dv={v.shape[3]}], got "
                     f"{jnp.shape(initial_state)}")


def _log_decay_bnt(log_decay, b, t, n):
  """Per-step log decay [B, N, T] f32 (zeros when absent), or [B, N, T, Dk] per channel."""
  if log_decay is None:
    return jnp.zeros((b, n, t), jnp.float32)
  g = jnp.asarray(log_decay, jnp.float32)
  if g.ndim == 1:
    return jnp.broadcast_to(g[None, :, None], (b, n, t))
  if g.ndim == 4:
    return g.transpose(0, 2, 1, 3)
  return g.transpose(0, 2, 1)


def _per_channel(log_decay) -> bool:
  return log_decay is not None and jnp.ndim(log_decay) == 4


def default_chunk_size(variant: str, length: int, per_channel: bool = False) -> int:
  """C when the caller gives none: 128 on TPU (the MXU tile; the decay rows need C % 128 == 0
  unless one chunk covers the sequence), 64 on GPU (Lightning Attention-2's block; a power of
  two as Triton needs), shrunk for short sequences; 16 with a per-channel decay (the [C, C, Dk]
  score product; GLA's sub-chunk). Not tuned on hardware."""
  if per_channel:
    return 16
  if variant == "tpu":
    return min(128, common.cdiv(length, 8) * 8)
  return min(64, max(16, common.next_power_of_2(length)))


def _check_chunk(variant: str, interpret: bool, chunk: int, length: int,
                 per_channel: bool) -> None:
  if chunk < 1:
    raise ValueError(f"chunk_size must be positive, got {chunk}")
  if interpret:
    return  # the interpreter takes any chunk
  if variant == "tpu" and per_channel:
    # Per-channel decays are [C, Dk] tiles like q: only the sublane multiple applies.
    if chunk % 8:
      raise ValueError(f"the TPU kernels need chunk_size % 8 == 0 with a per-channel decay, got "
                       f"{chunk}")
  elif variant == "tpu" and not (chunk % 128 == 0 or (chunk >= length and chunk % 8 == 0)):
    raise ValueError(f"the TPU kernels need chunk_size % 128 == 0 (decay rows on lanes), or one "
                     f"chunk % 8 == 0 covering the sequence, got {chunk} for T={length}")
  if variant == "gpu" and (chunk < 16 or chunk & (chunk - 1)):
    raise ValueError(f"the GPU (Triton) kernels need a power-of-two chunk_size >= 16, got {chunk}")


def _chunk_cumsum(g, chunk):
  """Inclusive cumulative sum of g [B, N, Tp] (or [B, N, Tp, Dk]) over time, restarting at every
  chunk."""
  b, n, tp = g.shape[:3]
  blocks = g.reshape(b, n, tp // chunk, chunk, *g.shape[3:])
  return jnp.cumsum(blocks, axis=3).reshape(g.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _chunked(spec, variant, interpret, q, k, v, g, s0):
  """Padded head-major pass: q [B, N, Tp, Dk], k [B, K, Tp, Dk], v [B, K, Tp, Dv], g [B, N, Tp]
  (or [B, N, Tp, Dk]) f32 per-step log decay, s0 [B, N, Dk, Dv] f32 -> (out [B, N, Tp, Dv],
  final state f32)."""
  return _VARIANTS[variant].forward(spec, q, k, v, _chunk_cumsum(g, spec.chunk), s0,
                                    interpret=interpret)


def _chunked_fwd(spec, variant, interpret, q, k, v, g, s0):
  out, final = _chunked(spec, variant, interpret, q, k, v, g, s0)
  return (out, final), (q, k, v, g, s0, final)


def _chunked_bwd(spec, variant, interpret, residuals, cotangents):
  q, k, v, g, s0, final = residuals
  dout, dfinal = cotangents
  dq, dk, dv, ds0 = _VARIANTS[variant].backward(
      spec, q, k, v, _chunk_cumsum(g, spec.chunk), s0, dout, dfinal.astype(jnp.float32),
      interpret=interpret)
  b, nk, tp, _ = k.shape
  groups = spec.groups
  dk = dk.reshape(b, nk, groups, tp, -1)
  dv = dv.reshape(b, nk, groups, tp, -1)
  if spec.per_channel:
    # The same, channel by channel: the final state's row d carries e^{G_Td}.
    qdq = q.astype(jnp.float32) * dq
    kdk = (k.astype(jnp.float32)[:, :, None] * dk).reshape(qdq.shape)
    dg = lax.cumsum(qdq - kdk, axis=2, reverse=True)
    dg = dg + jnp.sum(dfinal * final, axis=3)[:, :, None, :]
  elif spec.has_decay:
    # dL/dG_t = q.dq - k.dk per query head, then a reverse cumulative sum over time; the final
    # state (= e^{G_T} x something free of G) adds <dS_T, S_T> to every step.
    qdq = jnp.sum(q.astype(jnp.float32) * dq, axis=-1)
    kdk = jnp.sum(k.astype(jnp.float32)[:, :, None] * dk, axis=-1).reshape(qdq.shape)
    dg = lax.cumsum(qdq - kdk, axis=2, reverse=True)
    dg = dg + jnp.sum(dfinal * final, axis=(2, 3))[:, :, None]
  else:
    dg = jnp.zeros_like(g)
  return (dq.astype(q.dtype), dk.sum(axis=2).astype(k.dtype), dv.sum(axis=2).astype(v.dtype),
          dg, ds0)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def linear_attention(q, k, v, *, log_decay=None, initial_state=None,
                     chunk_size: int | None = None, scale: float | None = None,
                     return_final_state: bool = True, interpret: bool | None = None,
                     backend: str | None = None):
  """Chunked causal linear attention with optional decay, initial state and final state.

  Args:
    q: [B, T, N, Dk] queries.
    k: [B, T, K, Dk] keys, N % K == 0 (query head n reads key/value head n // (N // K)).
    v: [B, T, K, Dv] values (same dtype as q and k).
    log_decay: None (no decay), [N] (constant per head), [B, T, N] (per step and head) or
      [B, T, N, Dk] (per step, head and key channel: the state's rows decay apart): the log of
      the factor a_t that multiplies the state before step t is added. Differentiable.
    initial_state: [B, N, Dk, Dv] state before step 0 (None = zeros). Differentiable.
    chunk_size: C, steps per chunk; None picks `default_chunk_size`. T is padded to a multiple
      of C with steps of decay 1 and zero k, v, which leave the final state unchanged.
    scale: multiplies q; None means 1 (the recurrence as written; Dk ** -0.5 is common).
    return_final_state: also return the state after the last step.
    interpret: run the Pallas interpreter; None means only on CPU.
    backend: kernel variant override, "tpu" or "gpu"; None picks by backend.

  Returns:
    out [B, T, N, Dv] in q.dtype; with `return_final_state`, (out, final_state) with the state
    [B, N, Dk, Dv] float32. All arithmetic inside is float32.
  """
  _check_inputs(q, k, v, log_decay, initial_state)
  b, t, n, dk = q.shape
  dv = v.shape[3]
  variant = common.kernel_variant(backend)
  interpret = common.default_interpret() if interpret is None else bool(interpret)
  per_channel = _per_channel(log_decay)
  chunk = (default_chunk_size(variant, t, per_channel) if chunk_size is None
           else int(chunk_size))
  _check_chunk(variant, interpret, chunk, t, per_channel)
  spec = LinearSpec(chunk=chunk, scale=1.0 if scale is None else float(scale),
                    has_decay=log_decay is not None, groups=n // k.shape[2],
                    per_channel=per_channel)

  # Padded steps: zero q, k, v and log decay 0 (decay 1), so the state passes through them.
  qh, kh, vh = (common.pad_to_multiple(x, 1, chunk).transpose(0, 2, 1, 3) for x in (q, k, v))
  g = common.pad_to_multiple(_log_decay_bnt(log_decay, b, t, n), 2, chunk)
  s0 = (jnp.zeros((b, n, dk, dv), jnp.float32) if initial_state is None
        else jnp.asarray(initial_state).astype(jnp.float32))
  if variant == "gpu":
    # Triton tiles need power-of-two sizes >= 16; zero features add nothing to q.k or the state.
    wk, wv = (max(16, common.next_power_of_2(d)) for d in (dk, dv))
    qh, kh = (common.pad_to_multiple(x, 3, wk) for x in (qh, kh))
    vh = common.pad_to_multiple(vh, 3, wv)
    s0 = common.pad_to_multiple(common.pad_to_multiple(s0, 2, wk), 3, wv)
    if per_channel:
      g = common.pad_to_multiple(g, 3, wk)
  out, final = _chunked(spec, variant, interpret, qh, kh, vh, g, s0)
  out = out[:, :, :t, :dv].transpose(0, 2, 1, 3)
  return (out, final[:, :, :dk, :dv]) if return_final_state else out


def _reference_inputs(q, k, v, log_decay, initial_state):
  """f32 head-major q, k, v with K/V repeated per query head, log decay [B, N, T], state."""
  b, t, n, dk = q.shape
  groups = n // k.shape[2]
  qh, kh, vh = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (q, k, v))
  kh, vh = jnp.repeat(kh, groups, axis=1), jnp.repeat(vh, groups, axis=1)
  s0 = (jnp.zeros((b, n, dk, v.shape[3]), jnp.float32) if initial_state is None
        else jnp.asarray(initial_state).astype(jnp.float32))
  g = _log_decay_bnt(log_decay, b, t, n)
  if g.ndim == 3:
    g = g[..., None]  # one decay shared by every channel: [B, N, T, 1]
  return qh, kh, vh, g, s0


def linear_attention_reference(q, k, v, *, log_decay=None, initial_state=None,
                               scale: float | None = None, return_final_state: bool = True):
  """The quadratic masked form of `linear_attention`: materialises [B, N, T, T] decays.

  Args: as for `linear_attention` (without chunks, interpreter or variant).

  Returns:
    out [B, T, N, Dv] in q.dtype; with `return_final_state`, (out, final_state f32).
  """
  _check_inputs(q, k, v, log_decay, initial_state)
  scale = 1.0 if scale is None else float(scale)
  qh, kh, vh, g, s0 = _reference_inputs(q, k, v, log_decay, initial_state)
  t = q.shape[1]
  cum = jnp.cumsum(g, axis=2)  # G_t = sum_{r<=t} log a_r, [B, N, T, 1 or Dk]
  causal = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[..., None]
  decay = jnp.exp(jnp.where(causal, cum[..., :, None, :] - cum[..., None, :, :], -jnp.inf))
  hi = lax.Precision.HIGHEST
  scores = jnp.einsum("bntd,bnsd,bntsd->bnts", qh, kh, jnp.broadcast_to(
      decay, qh.shape[:3] + (t, qh.shape[3])), precision=hi)
  out = jnp.einsum("bnts,bnse->bnte", scores, vh, precision=hi)
  out = out + jnp.einsum("bntd,bnde->bnte", qh * jnp.exp(cum), s0, precision=hi)
  out = (out * scale).transpose(0, 2, 1, 3).astype(q.dtype)
  if not return_final_state:
    return out
  to_end = jnp.exp(cum[:, :, -1:] - cum)  # prod_{r>s} a_r
  final = jnp.swapaxes(jnp.exp(cum[:, :, -1:]), 2, 3) * s0 + jnp.einsum(
      "bnsd,bnse->bnde", kh * to_end, vh, precision=hi)
  return out, final


def linear_attention_recurrent(q, k, v, *, log_decay=None, initial_state=None,
                               scale: float | None = None, return_final_state: bool = True):
  """`linear_attention` as the recurrence itself: a `lax.scan` over time.

  Args: as for `linear_attention_reference`.

  Returns:
    out [B, T, N, Dv] in q.dtype; with `return_final_state`, (out, final_state f32).
  """
  _check_inputs(q, k, v, log_decay, initial_state)
  scale = 1.0 if scale is None else float(scale)
  qh, kh, vh, g, s0 = _reference_inputs(q, k, v, log_decay, initial_state)
  hi = lax.Precision.HIGHEST

  def step(state, xs):
    q_t, k_t, v_t, g_t = xs  # [B, N, Dk], [B, N, Dk], [B, N, Dv], [B, N, 1 or Dk]
    state = jnp.exp(g_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
    return state, jnp.einsum("bnd,bnde->bne", q_t, state, precision=hi) * scale

  time_major = lambda x: jnp.moveaxis(x, 2, 0)
  final, out = lax.scan(step, s0, (time_major(qh), time_major(kh), time_major(vh),
                                   jnp.moveaxis(g, 2, 0)))
  out = out.transpose(1, 0, 2, 3).astype(q.dtype)  # [T, B, N, Dv] -> [B, T, N, Dv]
  return (out, final) if return_final_state else out
