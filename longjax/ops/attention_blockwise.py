"""Blockwise (flash-style) softmax attention in plain XLA, with O(T·C) memory forward and backward.

Forward: for each query block, an online softmax over the key blocks it can see (running max,
normaliser and output accumulator in float32: `kernels_pallas.softmax.online_softmax_update`).
Only (q, k, v, out, lse) and the mask/bias arrays are saved; the backward pass recomputes the
probabilities block by block (flash-attention-2: D = rowsum(dO * O); dv, dk accumulated per key
block, dq accumulated into one [T, H] buffer), so no [T, S] array exists in either direction.

Blocks the mask rules out are not visited: loops over key (query) blocks run over the index
ranges the mask derives from its index rules (causal, window, global tokens, lengths), and with
segment ids a `lax.cond` skips blocks whose id ranges do not overlap. The loops have traced
bounds, which reverse-mode autodiff cannot see through; that is fine because the custom VJP below
never differentiates them.

Learned biases. The floating-point arrays of the bias spec (T5 tables, KERPLE and FIRE
parameters) get gradients. The logits of a block are s = scale * q.k + bias_block(params), so
d loss / d bias_block is exactly the block's `ds` (the gradient w.r.t. the scaled, biased
logits); the backward pass pulls each visited block's `ds` back through `bias.block` with
`jax.vjp` and accumulates the result into a cotangent shaped like the parameters. Blocks the mask
skips are never visited and hidden entries have ds = 0, so neither contributes. Memory stays
O(T*C): the accumulator is the size of the parameters, the pull-back's intermediates the size of a
block. Only leaves autodiff perturbs are pulled back (`symbolic_zeros`): positions, constant
ALiBi slopes and biases under `stop_gradient` cost nothing extra.

Layouts inside this module put heads before length so that each block is a batched matmul over
(batch, kv head) with the G = N // K query heads of a group sharing one K/V block (GQA without
repeating K/V): q, out [B, K, G, T, H]; k, v [B, K, S, H]; lse, D [B, K, G, T].
"""

import dataclasses
import functools

import jax
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero
import jax.numpy as jnp
from jax import lax

from kernels_pallas import common
from kernels_pallas import softmax
from longjax.ops.masks import AttentionMask


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static parameters of one call (hashable: it is a `nondiff_argnums` of the custom VJP)."""

  scale: float
  block_q: int
  block_kv: int
  q_length: int  # real lengths before padding
  kv_length: int


def _groups(x: jax.Array, num_kv_heads: int) -> jax.Array:
  """[B|1, N|1, q, s] -> [B|1, K|1, G|1, q, s], splitting query heads into (kv head, group)."""
  if x.shape[1] == 1:
    return x[:, :, None]
  return x.reshape(x.shape[0], num_kv_heads, x.shape[1] // num_kv_heads, *x.shape[2:])


def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums `x` over the axes that `shape` broadcasts (size 1 there), keeping them."""
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
  return x.sum(axis=axes, keepdims=True) if axes else x


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Trainable:
  """Per flattened bias leaf, whether autodiff wants its cotangent (a static residual)."""

  flags: tuple[bool, ...]


class _BiasBlocks:
  """A bias spec split into its trainable leaves and the rest, evaluated one block at a time."""

  def __init__(self, cfg: _Config, bias, trainable: tuple[bool, ...]):
    self.cfg = cfg
    self.leaves, self.treedef = jax.tree.flatten(bias)
    self.trainable = [i for i, flag in enumerate(trainable) if flag]

  def params(self) -> list[jax.Array]:
    return [self.leaves[i] for i in self.trainable]

  def block(self, params, q_start, kv_start) -> jax.Array:
    """f32 [B|1, N|1, Cq, Ckv] with `params` in place of the trainable leaves."""
    leaves = list(self.leaves)
    for i, p in zip(self.trainable, params):
      leaves[i] = p
    bias = self.treedef.unflatten(leaves)
    return bias.block(q_start, self.cfg.block_q, kv_start, self.cfg.block_kv)

  def cotangent(self, grads):
    """The bias pytree's cotangent: `grads` at the trainable leaves, None (zero) elsewhere."""
    cts = [None] * len(self.leaves)
    for i, g in zip(self.trainable, grads):
      cts[i] = g.astype(self.leaves[i].dtype)
    return self.treedef.unflatten(cts)


def _block_logits(cfg, q_blk, k_blk, mask, bias_blk, q_start, kv_start):
  """Scaled, biased, masked logits of one block: f32 [B, K, G, Cq, Ckv] (-inf where hidden).

  `bias_blk` is None or the bias block [B|1, N|1, Cq, Ckv].
  """
  s = jnp.einsum("bkgqh,bksh->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
  s = s * cfg.scale
  if bias_blk is not None:
    s = s + _groups(bias_blk, k_blk.shape[1])
  visible = mask.block(q_start, cfg.block_q, kv_start, cfg.block_kv,
                       q_length=cfg.q_length, kv_length=cfg.kv_length)
  return jnp.where(visible[:, :, None], s, -jnp.inf)


def _block_range(lo, hi, block: int):
  """Indices of the blocks of size `block` that intersect [lo, hi) (none when hi <= lo)."""
  first = lo // block
  last = jnp.where(hi > lo, common.cdiv(hi, block), first)
  return first, last


def _block_visits(ranges, block: int):
  """The blocks intersecting a union of index ranges, each once, as (count, block_of_visit).

  Ranges come in increasing order (the mask's leading keys, then its window); a block shared by
  two ranges is visited only for the first. `block_of_visit(j)` is the block index of visit j.
  """
  spans, starts, count, end = [], [], 0, None
  for lo, hi in ranges:
    first, last = _block_range(lo, hi, block)
    if end is not None:
      first = jnp.maximum(first, end)
      last = jnp.maximum(last, first)
    spans.append((first, last - first))
    starts.append(count)
    count, end = count + last - first, last

  def block_of_visit(j):
    first, start = spans[-1][0], starts[-1]
    index = first + j - start
    for (first, n), start in zip(spans[-2::-1], starts[-2::-1]):
      index = jnp.where(j < start + n, first + j - start, index)
    return index

  return count, block_of_visit


def _skip_if_empty(mask, cfg, q_start, kv_start, step, carry):
  """Runs `step(carry)` unless the mask rules the block out by content (segment ids).

  Index rules are already handled by loop bounds, so the cond is only worth its overhead when
  the mask has segment ids.
  """
  if not mask.has_segments:
    return step(carry)
  nonempty = mask.block_may_be_nonempty(q_start, cfg.block_q, kv_start, cfg.block_kv,
                                        q_length=cfg.q_length, kv_length=cfg.kv_length)
  return lax.cond(nonempty, step, lambda c: c, carry)


def _forward(cfg: _Config, q, k, v, mask, bias):
  """Returns out [B, K, G, Tp, H] in q.dtype and lse [B, K, G, Tp] f32 (padded lengths)."""
  b, nk, g, tp, h = q.shape
  out0 = jnp.zeros(q.shape, q.dtype)
  lse0 = jnp.full((b, nk, g, tp), -jnp.inf, jnp.float32)

  def q_step(i, carry):
    out, lse = carry
    q_start = i * cfg.block_q
    q_blk = lax.dynamic_slice_in_dim(q, q_start, cfg.block_q, axis=3)
    ranges = mask.kv_index_ranges(q_start, cfg.block_q, q_length=cfg.q_length,
                                  kv_length=cfg.kv_length)
    num_visits, block_of_visit = _block_visits(ranges, cfg.block_kv)

    def kv_step(visit, state):
      kv_start = block_of_visit(visit) * cfg.block_kv

      def compute(state):
        k_blk = lax.dynamic_slice_in_dim(k, kv_start, cfg.block_kv, axis=2)
        v_blk = lax.dynamic_slice_in_dim(v, kv_start, cfg.block_kv, axis=2)
        bias_blk = None if bias is None else bias.block(q_start, cfg.block_q, kv_start,
                                                        cfg.block_kv)
        s = _block_logits(cfg, q_blk, k_blk, mask, bias_blk, q_start, kv_start)
        return softmax.online_softmax_update(state, s, v_blk)

      return _skip_if_empty(mask, cfg, q_start, kv_start, compute, state)

    state0 = softmax.online_softmax_init((b, nk, g, cfg.block_q), h)
    state = lax.fori_loop(0, num_visits, kv_step, state0)
    # Rows with no visible key output zeros and lse = -inf.
    out_blk, lse_blk = softmax.online_softmax_finish(state)
    out_blk = out_blk.astype(out.dtype)
    out = lax.dynamic_update_slice_in_dim(out, out_blk, q_start, axis=3)
    lse = lax.dynamic_update_slice_in_dim(lse, lse_blk, q_start, axis=3)
    return out, lse

  return lax.fori_loop(0, tp // cfg.block_q, q_step, (out0, lse0))


def _backward(cfg: _Config, q, k, v, out, lse, mask, bias_blocks, d_out, d_lse):
  """Flash-attention-2 backward.

  Args:
    cfg, q, k, v, out, lse, mask: as saved by the forward pass.
    bias_blocks: None or the `_BiasBlocks` of the bias.
    d_out: cotangent of out, like out.
    d_lse: cotangent of lse, or None for zero.

  Returns:
    (dq, dk, dv) in the dtypes of (q, k, v) and the f32 gradients of the bias's trainable leaves
    (a list, empty without them).
  """
  sp = k.shape[2]
  # d lse_i / d s_ij = p_ij, so an lse cotangent enters exactly like -D.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  if d_lse is not None:
    delta = delta - d_lse
  # Rows without visible keys have lse = -inf; all their logits are -inf too, so shifting by 0
  # gives p = 0 instead of NaN.
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
  params = [] if bias_blocks is None else bias_blocks.params()

  def bias_and_pullback(q_start, kv_start):
    """The bias block and a function from its cotangent to the trainable leaves' cotangents."""
    if bias_blocks is None:
      return None, None
    if not params:
      return bias_blocks.block(params, q_start, kv_start), None
    return jax.vjp(lambda p: bias_blocks.block(p, q_start, kv_start), params)

  def kv_step(j, carry):
    dq, dk, dv, d_params = carry
    kv_start = j * cfg.block_kv
    k_blk = lax.dynamic_slice_in_dim(k, kv_start, cfg.block_kv, axis=2)
    v_blk = lax.dynamic_slice_in_dim(v, kv_start, cfg.block_kv, axis=2)

    def q_step(i, state):
      q_start = i * cfg.block_q

      def compute(state):
        dq, dk_blk, dv_blk, d_params = state
        sl = functools.partial(lax.dynamic_slice_in_dim, start_index=q_start,
                               slice_size=cfg.block_q, axis=3)
        q_blk, do_blk, lse_blk, delta_blk = sl(q), sl(d_out), sl(lse), sl(delta)
        bias_blk, pullback = bias_and_pullback(q_start, kv_start)
        s = _block_logits(cfg, q_blk, k_blk, mask, bias_blk, q_start, kv_start)
        p = jnp.exp(s - lse_blk[..., None])
        dv_blk += jnp.einsum("bkgqs,bkgqh->bksh", p.astype(d_out.dtype), do_blk,
                             preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgqh,bksh->bkgqs", do_blk, v_blk, preferred_element_type=jnp.float32)
        # d loss / d s for s = scale * q.k + bias (hidden entries have p = 0, so ds = 0): the
        # scale enters dq and dk below, the bias sees ds as it is.
        ds = p * (dp - delta_blk[..., None])
        dk_blk += jnp.einsum("bkgqs,bkgqh->bksh", ds.astype(q.dtype), q_blk,
                             preferred_element_type=jnp.float32)
        dq_blk = jnp.einsum("bkgqs,bksh->bkgqh", ds.astype(k.dtype), k_blk,
                            preferred_element_type=jnp.float32)
        dq = lax.dynamic_update_slice_in_dim(dq, sl(dq) + dq_blk, q_start, axis=3)
        if pullback is not None:
          # [B, K, G, Cq, Ckv] -> [B, N, Cq, Ckv] (head n = kv head * G + group), then summed
          # over the axes the bias block broadcasts.
          ds_heads = ds.reshape(ds.shape[0], -1, *ds.shape[3:])
          (grads,) = pullback(_sum_to_shape(ds_heads, bias_blk.shape))
          d_params = [a + g.astype(jnp.float32) for a, g in zip(d_params, grads)]
        return dq, dk_blk, dv_blk, d_params

      return _skip_if_empty(mask, cfg, q_start, kv_start, compute, state)

    lo, hi = mask.q_index_range(kv_start, cfg.block_kv, q_length=cfg.q_length,
                                kv_length=cfg.kv_length)
    first, last = _block_range(lo, hi, cfg.block_q)
    blk_shape = (*k_blk.shape[:2], cfg.block_kv, k_blk.shape[3])
    state0 = (dq, jnp.zeros(blk_shape, jnp.float32), jnp.zeros(blk_shape, jnp.float32),
              d_params)
    dq, dk_blk, dv_blk, d_params = lax.fori_loop(first, last, q_step, state0)
    # The scale is applied once per block here rather than to every ds.
    dk = lax.dynamic_update_slice_in_dim(dk, (dk_blk * cfg.scale).astype(dk.dtype), kv_start,
                                         axis=2)
    dv = lax.dynamic_update_slice_in_dim(dv, dv_blk.astype(dv.dtype), kv_start, axis=2)
    return dq, dk, dv, d_params

  carry0 = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, k.dtype),
            jnp.zeros(v.shape, v.dtype), [jnp.zeros(p.shape, jnp.float32) for p in params])
  dq, dk, dv, d_params = lax.fori_loop(0, sp // cfg.block_kv, kv_step, carry0)
  return (dq * cfg.scale).astype(q.dtype), dk, dv, d_params


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: _Config, q, k, v, mask, bias):
  return _forward(cfg, q, k, v, mask, bias)


def _is_primal(x) -> bool:
  return isinstance(x, CustomVJPPrimal)


def _attention_fwd(cfg, q, k, v, mask, bias):
  # With `symbolic_zeros` every leaf arrives as (value, perturbed); `perturbed` says which bias
  # leaves autodiff differentiates, so the backward pass pulls back through those alone.
  trainable = _Trainable(tuple(x.perturbed for x in jax.tree.leaves(bias, is_leaf=_is_primal)))
  q, k, v, mask, bias = jax.tree.map(lambda x: x.value, (q, k, v, mask, bias),
                                     is_leaf=_is_primal)
  out, lse = _forward(cfg, q, k, v, mask, bias)
  return (out, lse), (q, k, v, out, lse, mask, bias, trainable)


def _attention_bwd(cfg, residuals, cotangents):
  q, k, v, out, lse, mask, bias, trainable = residuals
  d_out, d_lse = cotangents
  # Symbolic zeros: an unused output (usually lse) needs no work.
  if isinstance(d_out, SymbolicZero):
    d_out = jnp.zeros(out.shape, out.dtype)
  if isinstance(d_lse, SymbolicZero):
    d_lse = None
  bias_blocks = None if bias is None else _BiasBlocks(cfg, bias, trainable.flags)
  dq, dk, dv, d_params = _backward(cfg, q, k, v, out, lse, mask, bias_blocks, d_out, d_lse)
  d_bias = None if bias is None else bias_blocks.cotangent(d_params)
  # Masks carry no trainable parameters (ids and offsets are integers): None is a zero cotangent.
  return dq, dk, dv, None, d_bias


_attention.defvjp(_attention_fwd, _attention_bwd, symbolic_zeros=True)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: AttentionMask,
                        bias=None, scale: float, block_size: int) -> tuple[jax.Array, jax.Array]:
  """Blockwise attention; call it through `longjax.ops.dot_product_attention`.

  Args:
    q: [B, T, N, H].
    k: [B, S, K, H] with N % K == 0.
    v: [B, S, K, H].
    mask: the attention mask spec.
    bias: None or a block bias (see `longjax.ops.biases`); its floating-point arrays get
      gradients (see the module docstring), its integer arrays (positions) do not.
    scale: Python float multiplying the logits.
    block_size: block length C for queries and keys (each capped at its sequence length);
      lengths that are not multiples of it are padded internally.

  Returns:
    out [B, T, N, H] in q.dtype and lse [B, N, T] float32.
  """
  b, t, n, h = q.shape
  s, nk = k.shape[1], k.shape[2]
  g = n // nk
  cfg = _Config(scale=float(scale), block_q=min(block_size, t), block_kv=min(block_size, s),
                q_length=t, kv_length=s)
  # [B, T, N, H] -> [B, K, G, T, H] and [B, S, K, H] -> [B, K, S, H]: one O(T) copy each, so
  # that every block matmul is batched over (B, K) with contiguous rows.
  qt = common.pad_to_multiple(q.reshape(b, t, nk, g, h).transpose(0, 2, 3, 1, 4), 3, cfg.block_q)
  kt = common.pad_to_multiple(k.transpose(0, 2, 1, 3), 2, cfg.block_kv)
  vt = common.pad_to_multiple(v.transpose(0, 2, 1, 3), 2, cfg.block_kv)
  out, lse = _attention(cfg, qt, kt, vt, mask, bias)
  out = out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
  return out, lse[:, :, :, :t].reshape(b, n, t)
