"""Causal linear attention with decay, document resets and normalisation: the maths of the
linear-attention mixers (vanilla feature-map attention, Lightning / TransNormerLLM, RetNet).

Per batch element and head, with a_t = exp(log_decay_t) and m_t = 0 where a new document starts
(`segment_ids[t] != segment_ids[t-1]`, t > 0), else 1:

  S_t = m_t a_t S_{t-1} + k_t^T v_t        (S_{-1} = initial_state, [Dk, Dv])
  o_t = scale * q_t S_t

so o_t = scale * sum over s <= t in t's document of (prod_{r=s+1..t} a_r) (q_t . k_s) v_s, plus
scale * (prod_{r<=t} a_r) q_t S_{-1} while t is still in the first document. A reset is a decay
of exactly 0: no state crosses a document boundary of a packed batch.

`normalize=True` divides by the same sum with v = 1: o_t = num_t / (q_t . z_t + eps) (Katharopoulos
et al. 2020). The op appends a ones column to v, so the state is [Dk, Dv + 1] and carries z as
its last column (a decode cache holds it like any other state).

Implementations (`LINEAR_ATTENTION`, chosen by `longjax.ops.dispatch`):
  reference  the quadratic masked form: [B, N, T, T] decays; for tests and short sequences.
  recurrent  the recurrence itself, a `lax.scan` over time: the independent check of the others.
  chunked    XLA, Lightning Attention-2's tiling: the masked quadratic form inside chunks of C
             steps, the [Dk, Dv] state passed between chunks by a scan over T / C chunks,
             in rematerialised blocks of 1024 steps (temporaries O(1024 C) whatever T);
             matmul-shaped work. The CPU default and the fallback everywhere.
  pallas     `kernels_pallas.linear` (chunked in VMEM / SRAM; TPU and GPU; every decay form,
             per channel in 16-step chunks); it has no document resets, so packed batches
             take the chunked form.

Shapes: q, k [B, T, N, Dk]; v [B, T, N, Dv]; log_decay [N] (per head), [B, T, N] (per step)
or [B, T, N, Dk] (per step and key channel: GLA's diag(a_t) S_{t-1});
segment_ids [B, T] int; initial_state [B, N, Dk, Dv (+1 normalised)] float32. Arithmetic is
float32 inside; the output has q's dtype, the final state is float32.
"""

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from kernels_pallas import linear as linear_kernel
from longjax.ops import dispatch
from longjax.ops.masks import document_keep

# Keeps q . z away from 0 where a normalised row has (almost) no mass.
NORMALIZER_EPS = 1e-6
DEFAULT_CHUNK = 64
# Per-channel decay materialises [C, C, Dk] decays per chunk (no matmul form is stable when a
# channel decays fast): smaller chunks, as GLA's own kernels use 16-step sub-chunks.
DEFAULT_CHUNK_PER_CHANNEL = 16
# The chunked form runs on blocks of this many steps, one after another (`_blocked`).
BLOCK = 1024



def taylor2_features(x: jax.Array) -> jax.Array:
  """Based's 2nd-order Taylor map (Arora et al. 2024): [..., F] -> [..., 1 + F + F^2] with
  phi(q) . phi(k) = 1 + u + u^2 / 2, u = q . k / sqrt(F): exp(u) to second order."""
  f = x.shape[-1]
  outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], f * f)
  return jnp.concatenate([jnp.ones(x.shape[:-1] + (1,), x.dtype), x * f ** -0.25,
                          outer * (0.5 ** 0.5 * f ** -0.5)], axis=-1)


def hedgehog_features(x: jax.Array, weight: jax.Array, bias: jax.Array) -> jax.Array:
  """Hedgehog's learnable map (Zhang, Bhatia, Kumbong & Ré 2024, "The Hedgehog & the
  Porcupine"): [..., N, F] -> [..., N, 2F], per head n with z = x W_n + b_n,
  phi(x) = [softmax(z), softmax(-z)]: positive features whose dot products can learn to mimic
  softmax attention's spikiness. weight [N, F, F], bias [N, F]."""
  z = (jnp.einsum("...nf,nfg->...ng", x.astype(jnp.float32), weight.astype(jnp.float32))
       + bias.astype(jnp.float32))
  return jnp.concatenate([jax.nn.softmax(z, axis=-1), jax.nn.softmax(-z, axis=-1)],
                         axis=-1).astype(x.dtype)


# Parameter-free maps by name; "hedgehog" (learnable, `hedgehog_features`) lives in the module
# that owns its weights.
FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu1": lambda x: jax.nn.elu(x) + 1.0,  # Katharopoulos et al. 2020: positive features
    "relu": jax.nn.relu,
    "taylor2": taylor2_features,
}
LEARNABLE_FEATURE_MAPS = ("hedgehog",)
# Feature maps whose dot products phi(q) . phi(k) are >= 0 (> 0 for taylor2: 1 + u + u^2/2 is
# at least 1/2; hedgehog's softmaxes are > 0), so q . z > 0 and normalisation is well defined.
POSITIVE_FEATURE_MAPS = ("elu1", "relu", "taylor2", "hedgehog")


def feature_size(feature_map: str, dim: int) -> int:
  """The width of phi(x) for x of width `dim`."""
  if feature_map == "taylor2":
    return 1 + dim + dim * dim
  return 2 * dim if feature_map == "hedgehog" else dim


@dataclasses.dataclass(frozen=True)
class LinearAttentionCall:
  """What the dispatcher's checks read: T, whether documents reset the state, the decay form."""
  length: int
  has_segments: bool
  decay: str  # "none" | "head" ([N]) | "step" ([B, T, N]) | "channel" ([B, T, N, Dk])


def _pallas_unsupported(call: LinearAttentionCall, context: dispatch.Context) -> str | None:
  del context
  if call.has_segments:
    return "document resets (segment_ids) are not in the kernel"
  return None


def _pallas_passed_over(call: LinearAttentionCall, context: dispatch.Context) -> str | None:
  del call
  if context.backend == "cpu":
    return "Pallas runs interpreted on CPU (for tests), far slower than XLA"
  return None


def _reference_passed_over(call: LinearAttentionCall, context: dispatch.Context) -> str | None:
  del context
  if call.length > 1024:
    return f"T={call.length}: the quadratic form's [T, T] decays"
  return None


LINEAR_ATTENTION = dispatch.Op(
    name="linear attention",
    implementations=(
        dispatch.Implementation("reference", passed_over=_reference_passed_over),
        dispatch.Implementation("recurrent"),
        dispatch.Implementation("chunked"),
        dispatch.Implementation("pallas", unsupported=_pallas_unsupported,
                                passed_over=_pallas_passed_over),
    ),
    preference={"cpu": ("chunked",), "gpu": ("pallas", "chunked"),
                "tpu": ("pallas", "chunked")},
)
IMPLS = LINEAR_ATTENTION.choices


def state_shape(batch_size: int, num_heads: int, key_dim: int, value_dim: int,
                normalize: bool) -> tuple[int, int, int, int]:
  """The recurrent state's shape [B, N, Dk, Dv (+1 normalised)]: constant in the length."""
  return (batch_size, num_heads, key_dim, value_dim + int(normalize))


def _check(q, k, v, log_decay, segment_ids, initial_state, normalize):
  if q.ndim != 4 or q.shape != k.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q and k must be [B, T, N, Dk] and v [B, T, N, Dv], got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  b, t, n, dk = q.shape
  if log_decay is not None and jnp.shape(log_decay) not in ((n,), (b, t, n), (b, t, n, dk)):
    raise ValueError(f"log_decay must be [N={n}], [B={b}, T={t}, N={n}] or [B, T, N, Dk={dk}], "
                     f"got {jnp.shape(log_decay)}")
  if segment_ids is not None and jnp.shape(segment_ids) != (b, t):
    raise ValueError(f"segment_ids must be [B={b}, T={t}], got {jnp.shape(segment_ids)}")
  want = state_shape(b, n, dk, v.shape[3], normalize)
  if initial_state is not None and jnp.shape(initial_state) != want:
    raise ValueError(f"initial_state must be {list(want)} (normalize={normalize}), got "
                     f"{jnp.shape(initial_state)}")


def _decay_kind(log_decay) -> str:
  if log_decay is None:
    return "none"
  return {1: "head", 3: "step", 4: "channel"}[jnp.ndim(log_decay)]


def _prepare(q, k, v, log_decay, segment_ids, initial_state, normalize):
  """Head-major f32 q, k, v [B, N, T, D] (v with its ones column when normalised), log decay
  [B, N, T, G] (G = 1 for a scalar decay, Dk per channel), keep [B, T] (0 where a document
  starts), initial state [B, N, Dk, Dv']."""
  b, t, n, dk = q.shape
  qh, kh, vh = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (q, k, v))
  if normalize:
    vh = jnp.concatenate([vh, jnp.ones(vh.shape[:3] + (1,), jnp.float32)], axis=-1)
  if log_decay is None:
    g = jnp.zeros((b, n, t, 1), jnp.float32)
  elif jnp.ndim(log_decay) == 1:
    g = jnp.broadcast_to(jnp.asarray(log_decay, jnp.float32)[None, :, None, None], (b, n, t, 1))
  elif jnp.ndim(log_decay) == 3:
    g = jnp.asarray(log_decay, jnp.float32).transpose(0, 2, 1)[..., None]
  else:
    g = jnp.asarray(log_decay, jnp.float32).transpose(0, 2, 1, 3)
  keep = document_keep(segment_ids, b, t)
  s0 = (jnp.zeros((b, n, dk, vh.shape[-1]), jnp.float32) if initial_state is None
        else jnp.asarray(initial_state, jnp.float32))
  return qh, kh, vh, g, keep, s0


def _finish(out, q, normalize, v_dim):
  """[B, N, T, Dv'] f32 -> [B, T, N, Dv] in q.dtype, dividing by q . z when normalised."""
  if normalize:
    out = out[..., :v_dim] / (out[..., v_dim:] + NORMALIZER_EPS)
  return out.transpose(0, 2, 1, 3).astype(q.dtype)


def _decayed_scores(q, k, cum, visible):
  """sum_d q_td k_sd exp(cum_td - cum_sd) where visible[t, s], else 0.

  q, k [..., T, Dk]; cum [..., T, G] (G = 1: one decay for every channel, a matmul; G = Dk:
  per channel, through a [..., T, T, Dk] tensor); visible [..., T, T] broadcastable.
  """
  diff = cum[..., :, None, :] - cum[..., None, :, :]  # [..., T, T, G]
  decay = jnp.exp(jnp.where(visible[..., None], diff, -jnp.inf))
  if cum.shape[-1] == 1:
    return jnp.einsum("...td,...sd->...ts", q, k) * decay[..., 0]
  return jnp.einsum("...td,...sd,...tsd->...ts", q, k, decay)


def _reference(qh, kh, vh, g, keep, s0, scale):
  t = qh.shape[2]
  cum = jnp.cumsum(g, axis=2)  # G_t, [B, N, T, G]
  document = jnp.cumsum(1.0 - keep, axis=-1)  # which document of the row t is in, [B, T]
  same = document[:, :, None] == document[:, None, :]
  visible = (jnp.tril(jnp.ones((t, t), bool)) & same)[:, None]  # [B, 1, T, T]
  with jax.default_matmul_precision("highest"):
    scores = _decayed_scores(qh, kh, cum, visible)
    first = (document == 0)[:, None, :, None]  # t still in the initial state's document
    carried = jnp.where(first, jnp.exp(cum), 0.0)
    out = jnp.einsum("bnts,bnse->bnte", scores, vh)
    out = scale * (out + jnp.einsum("bntd,bnde->bnte", qh * carried, s0))
    last = document[:, -1:]
    to_end = jnp.where((document == last)[:, None, :, None], jnp.exp(cum[:, :, -1:] - cum), 0.0)
    final = jnp.einsum("bnsd,bnse->bnde", kh * to_end, vh)
  through = jnp.where((last == 0)[..., None], jnp.exp(cum[:, :, -1]), 0.0)  # [B, N, G]
  return out, final + through[..., None] * s0


def _recurrent(qh, kh, vh, g, keep, s0, scale):
  def step(state, xs):
    q_t, k_t, v_t, g_t, keep_t = xs  # [B, N, Dk], [B, N, Dk], [B, N, Dv], [B, N, G], [B]
    factor = jnp.exp(g_t) * keep_t[:, None, None]
    state = factor[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
    out = jnp.einsum("bnd,bnde->bne", q_t, state, precision=lax.Precision.HIGHEST)
    return state, scale * out

  time_major = lambda x: jnp.moveaxis(x, 2, 0)
  final, out = lax.scan(step, s0, (time_major(qh), time_major(kh), time_major(vh),
                                   time_major(g), jnp.moveaxis(keep, 1, 0)))
  return jnp.moveaxis(out, 0, 2), final


def _chunked(qh, kh, vh, g, keep, s0, scale, chunk):
  b, n, t, _ = qh.shape
  c = min(chunk, t)
  pad = -t % c
  # Padded steps have zero q, k, v, decay 1 and no reset: the state passes through unchanged.
  qh, kh, vh, g = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (qh, kh, vh, g))
  keep = jnp.pad(keep, ((0, 0), (0, pad)), constant_values=1.0)
  nc = (t + pad) // c
  chunks = lambda x: x.reshape(b, n, nc, c, x.shape[-1])
  qc, kc, vc = chunks(qh), chunks(kh), chunks(vh)
  cum = jnp.cumsum(chunks(g), axis=3)  # log decay from the chunk's start, [B, N, Nc, C, G]
  # Resets so far inside the chunk, [B, 1, Nc, C]: equal counts = same document.
  resets = jnp.cumsum(1.0 - keep.reshape(b, 1, nc, c), axis=-1)
  visible = jnp.tril(jnp.ones((c, c), bool)) & (resets[..., :, None] == resets[..., None, :])
  inner = jnp.einsum("bncts,bncse->bncte", _decayed_scores(qc, kc, cum, visible), vc)

  # What each chunk adds to the state, and how the state entering it decays through it.
  last = cum[:, :, :, -1:]  # [B, N, Nc, 1, G]
  to_end = jnp.where((resets[..., -1:] == resets)[..., None], jnp.exp(last - cum), 0.0)
  added = jnp.einsum("bncsd,bncse->bncde", kc * to_end, vc)  # [B, N, Nc, Dk, Dv]
  through = jnp.where((resets[..., -1] == 0)[..., None], jnp.exp(last[:, :, :, 0]), 0.0)

  def pass_state(state, xs):
    added_c, through_c = xs  # [B, N, Dk, Dv], [B, N, G]
    return through_c[..., None] * state + added_c, state

  final, entering = lax.scan(pass_state, s0, (jnp.moveaxis(added, 2, 0),
                                              jnp.moveaxis(through, 2, 0)))
  entering = jnp.moveaxis(entering, 0, 2)  # the state before each chunk, [B, N, Nc, Dk, Dv]
  from_start = jnp.where((resets == 0)[..., None], jnp.exp(cum), 0.0)
  outer = jnp.einsum("bnctd,bncde->bncte", qc * from_start, entering)
  out = scale * (inner + outer).reshape(b, n, t + pad, -1)[:, :, :t]
  return out, final


def _blocked(qh, kh, vh, g, keep, s0, scale, chunk):
  """`_chunked` on blocks of `BLOCK` steps, a rematerialised scan carrying the state.

  The chunked form's temporaries ([C, C] decayed scores per chunk, per-chunk states, and with a
  per-channel decay [C, C, Dk] per chunk) are O(T C); in blocks they are O(BLOCK C) whatever T,
  and the backward pass keeps only each block's inputs and entering state. On the 2-core CPU at
  T = 8192 (B 1, N 4, D 64, fwd + bwd): temporaries 72 -> 41 MiB and 0.111 -> 0.091 s with a
  per-head decay; 507 -> 105 MiB and 0.356 -> 0.233 s per channel (blocks fit in cache).
  """
  b, n, t, _ = qh.shape
  block = max(chunk, BLOCK // chunk * chunk)
  if t <= block:
    return _chunked(qh, kh, vh, g, keep, s0, scale, chunk)
  pad = -t % block
  qh, kh, vh, g = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (qh, kh, vh, g))
  keep = jnp.pad(keep, ((0, 0), (0, pad)), constant_values=1.0)
  nb = (t + pad) // block
  blocks = lambda x: jnp.moveaxis(x.reshape(b, n, nb, block, x.shape[-1]), 2, 0)
  keep_blocks = jnp.moveaxis(keep.reshape(b, nb, block), 1, 0)

  @jax.checkpoint
  def body(state, xs):
    q, k, v, g_, keep_ = xs
    out, state = _chunked(q, k, v, g_, keep_, state, scale, chunk)
    return state, out

  final, out = lax.scan(body, s0, (blocks(qh), blocks(kh), blocks(vh), blocks(g), keep_blocks))
  out = jnp.moveaxis(out, 0, 2).reshape(b, n, t + pad, -1)[:, :, :t]
  return out, final


def _pallas(qh, kh, vh, g, s0, scale, chunk, decay):
  """The Pallas kernel on head-major inputs (no resets)."""
  to_btnd = lambda x: x.transpose(0, 2, 1, 3)
  log_decay = {"none": None, "channel": to_btnd(g)}.get(decay, g[..., 0].transpose(0, 2, 1))
  out, final = linear_kernel.linear_attention(
      to_btnd(qh), to_btnd(kh), to_btnd(vh), log_decay=log_decay, initial_state=s0,
      chunk_size=chunk, scale=scale)
  return to_btnd(out), final


def linear_attention(q, k, v, *, log_decay=None, segment_ids=None, initial_state=None,
                     normalize: bool = False, scale: float = 1.0, impl: str = "auto",
                     chunk_size: int | None = None):
  """Causal linear attention with optional decay, document resets and normalisation.

  Args:
    q: [B, T, N, Dk] queries, after the mixer's feature map.
    k: [B, T, N, Dk] keys, after the feature map.
    v: [B, T, N, Dv] values.
    log_decay: None (no decay), [N], [B, T, N] or [B, T, N, Dk] (per key channel: GLA):
      log a_t, the factor the state (its rows, per channel) is multiplied by before step t adds
      to it (<= 0 for a decay). Differentiable.
    segment_ids: [B, T] document ids of a packed batch (None: one document per row); the state
      restarts from zero where the id changes.
    initial_state: the state before step 0 (`state_shape`), e.g. a decode cache's; None = 0.
    normalize: divide by q_t . z_t (z the decayed sum of keys); the state gains a column.
    scale: multiplies q (1 = the recurrence as written; RetNet and Lightning use Dk ** -0.5).
    impl: "auto" or one of `LINEAR_ATTENTION.names`.
    chunk_size: C of the chunked forms (None: 64, 16 with a per-channel decay, or T when
      shorter; the kernel's default).

  Returns:
    (out [B, T, N, Dv] in q.dtype, final_state [B, N, Dk, Dv (+1)] float32).
  """
  _check(q, k, v, log_decay, segment_ids, initial_state, normalize)
  b, t = q.shape[:2]
  decay = _decay_kind(log_decay)
  call = LinearAttentionCall(length=t, has_segments=segment_ids is not None, decay=decay)
  name = dispatch.resolve(LINEAR_ATTENTION, impl, call).impl
  qh, kh, vh, g, keep, s0 = _prepare(q, k, v, log_decay, segment_ids, initial_state, normalize)
  if name == "reference":
    out, final = _reference(qh, kh, vh, g, keep, s0, scale)
  elif name == "recurrent":
    out, final = _recurrent(qh, kh, vh, g, keep, s0, scale)
  elif name == "chunked":
    default = DEFAULT_CHUNK_PER_CHANNEL if decay == "channel" else DEFAULT_CHUNK
    out, final = _blocked(qh, kh, vh, g, keep, s0, scale, chunk_size or default)
  else:
    out, final = _pallas(qh, kh, vh, g, s0, scale, chunk_size, decay)
  return _finish(out, q, normalize, v.shape[3]), final
