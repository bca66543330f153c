"""Learned relative-position logit biases: T5 buckets, KERPLE, FIRE.

Each is a pure function of its parameters and explicit positions, returning the bias to add to the
attention logits of query positions `q_positions` [B, T] against key positions `kv_positions`
[B, S]: float32 [B, N, T, S]. Attention implementations call them one block of positions at a time
(see `longjax.ops.biases`), so T and S are block sizes in practice. Distances are taken in int32
before any conversion, so they are exact at any position.

  * T5 (Raffel et al. 2020, "Exploring the Limits of Transfer Learning", Sec. 2.1): a learned
    scalar per head and distance bucket; buckets are exact for small distances and logarithmically
    wider up to `max_distance`, beyond which all distances share the last bucket.
  * KERPLE (Chi et al. 2022, "KERPLE: Kernelized Relative Positional Embedding for Length
    Extrapolation"): conditionally positive definite kernels of |m - n| with learned r1, r2 > 0 per
    head: logarithmic -r1 log(1 + r2 |m - n|), power -r1 |m - n|^r2 (0 < r2 <= 2).
  * FIRE (Li et al. 2024, "Functional Interpolation for Relative Positions Improves Long Context
    Transformers"): b(i, j) = f(psi(i - j) / psi(max(L, i))), psi(x) = log(c x + 1), with an MLP f
    (one output per head), learned c and threshold L. Dividing by the query position's psi maps
    every distance into [0, 1] ("progressive interpolation"), so longer inputs reuse the trained
    range of f instead of leaving it.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.t5_buckets import t5_bucket_table  # noqa: F401 (re-exported)


def _distance(q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
  """i - j as int32 [B, T, S]."""
  q = jnp.asarray(q_positions, jnp.int32)
  kv = jnp.asarray(kv_positions, jnp.int32)
  return q[:, :, None] - kv[:, None, :]


# --- T5 ---------------------------------------------------------------------------------------
# `t5_bucket_table` lives in the kernel package, so that the flash kernel and these biases share
# one table (kernels_pallas is a leaf package: it cannot import longjax).


def t5_buckets(q_positions: jax.Array, kv_positions: jax.Array, *, num_buckets: int,
               max_distance: int, bidirectional: bool) -> jax.Array:
  """Bucket ids int32 [B, T, S] of every (query, key) pair (see `t5_bucket_table`)."""
  table = jnp.asarray(t5_bucket_table(num_buckets, max_distance, bidirectional))
  d = jnp.clip(_distance(q_positions, kv_positions), -max_distance, max_distance)
  return jnp.take(table, d + max_distance, mode="clip")


def t5_bias(table: jax.Array, q_positions: jax.Array, kv_positions: jax.Array, *,
            max_distance: int, bidirectional: bool) -> jax.Array:
  """T5 relative bias: table[bucket(i - j), n].

  Args:
    table: [num_buckets, N] learned biases.
    q_positions: [B, T] int32.
    kv_positions: [B, S] int32.
    max_distance, bidirectional: see `t5_bucket_table`.

  Returns:
    f32 [B, N, T, S].
  """
  num_buckets = table.shape[0]
  lookup = jnp.asarray(t5_bucket_table(num_buckets, max_distance, bidirectional))
  # Gather per distance rather than per bucket: one [2 * max_distance + 1, N] table, then one
  # gather per (query, key) pair.
  per_distance = jnp.take(jnp.asarray(table, jnp.float32), lookup, axis=0, mode="clip").T
  d = jnp.clip(_distance(q_positions, kv_positions), -max_distance, max_distance)
  return jnp.moveaxis(jnp.take(per_distance, d + max_distance, axis=1, mode="clip"), 0, 1)


# --- KERPLE -----------------------------------------------------------------------------------

KERPLE_KINDS = ("log", "power")


def kerple_bias(r1: jax.Array, r2: jax.Array, q_positions: jax.Array, kv_positions: jax.Array, *,
                kind: str) -> jax.Array:
  """KERPLE bias: -r1 log(1 + r2 |i - j|) ("log") or -r1 |i - j|^r2 ("power").

  Args:
    r1: [N] positive scales.
    r2: [N] positive; the power variant needs r2 <= 2 for the kernel to be conditionally
      positive definite (the caller's parametrisation keeps it there).
    q_positions: [B, T] int32.
    kv_positions: [B, S] int32.
    kind: "log" or "power".

  Returns:
    f32 [B, N, T, S].
  """
  d = jnp.abs(_distance(q_positions, kv_positions)).astype(jnp.float32)[:, None]  # [B, 1, T, S]
  r1 = jnp.asarray(r1, jnp.float32)[None, :, None, None]
  r2 = jnp.asarray(r2, jnp.float32)[None, :, None, None]
  if kind == "log":
    return -r1 * jnp.log1p(r2 * d)
  if kind == "power":
    # d^r2 as exp(r2 log d) with d = 0 handled apart: autodiff of 0^r2 w.r.t. r2 would be
    # 0 * log(0) = NaN, and NaN times a zero cotangent is still NaN.
    positive = d > 0
    log_d = jnp.log(jnp.where(positive, d, 1.0))
    return -r1 * jnp.where(positive, jnp.exp(r2 * log_d), 0.0)
  raise ValueError(f"kind={kind!r}; valid: {KERPLE_KINDS}")


# --- FIRE -------------------------------------------------------------------------------------


class FireParams(NamedTuple):
  """FIRE's parameters (all float32).

  Attributes:
    c: [] positive scale of psi(x) = log(c x + 1).
    threshold: [] positive L: positions below it are normalised as if they were at L.
    w1: [F] first-layer weights of f (its input is a scalar).
    b1: [F] first-layer biases.
    w2: [F, N] second-layer weights, one output per head.
    b2: [N] second-layer biases.
  """

  c: jax.Array
  threshold: jax.Array
  w1: jax.Array
  b1: jax.Array
  w2: jax.Array
  b2: jax.Array


# Keeps the normaliser away from 0 should c shrink towards 0 during training.
FIRE_EPS = 1e-6


def fire_normalized_distance(c: jax.Array, threshold: jax.Array, q_positions: jax.Array,
                             kv_positions: jax.Array) -> jax.Array:
  """psi(|i - j|) / psi(max(L, i)) with psi(x) = log(c x + 1): f32 [B, T, S], in [0, 1] for j <= i.

  The paper defines FIRE for causal attention (j <= i); |i - j| extends it symmetrically to keys
  after the query, which keeps psi finite (and its gradient too) where the causal mask hides them.
  """
  c = jnp.asarray(c, jnp.float32)
  d = jnp.abs(_distance(q_positions, kv_positions)).astype(jnp.float32)
  i = jnp.asarray(q_positions, jnp.int32).astype(jnp.float32)
  normaliser = jnp.log1p(c * jnp.maximum(jnp.asarray(threshold, jnp.float32), i)) + FIRE_EPS
  return jnp.log1p(c * d) / normaliser[:, :, None]


def fire_bias(fire: FireParams, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
  """FIRE bias f(psi(i - j) / psi(max(L, i))), f(x) = w2 . relu(w1 x + b1) + b2 per head.

  Args:
    fire: the parameters (c and threshold already positive).
    q_positions: [B, T] int32.
    kv_positions: [B, S] int32.

  Returns:
    f32 [B, N, T, S].
  """
  x = fire_normalized_distance(fire.c, fire.threshold, q_positions, kv_positions)
  hidden = jax.nn.relu(x[..., None] * fire.w1 + fire.b1)  # [B, T, S, F]
  out = jnp.einsum("btsf,fn->bnts", hidden, jnp.asarray(fire.w2, jnp.float32))
  return out + jnp.asarray(fire.b2, jnp.float32)[None, :, None, None]
