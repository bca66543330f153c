"""Inputs, a loss and a comparison shared by the attention kernel tests (Pallas and CPU)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Tolerance per dtype, relative to the largest magnitude of the compared array. f32: the kernels
# and the reference differ only in summation order. bf16: both round probabilities and dS to
# bf16 before matmuls, the kernels relative to a running maximum, and gradients sum many rounded
# terms, so allow a few bf16 ulps (2^-8 ~ 4e-3).
TOLERANCES = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def random_inputs(seed, batch, t, s, num_heads, num_kv_heads, head_dim, dtype):
  rng = np.random.default_rng(seed)
  shapes = ((batch, t, num_heads, head_dim), (batch, s, num_kv_heads, head_dim),
            (batch, s, num_kv_heads, head_dim))
  return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


def packed_segments(seed, batch, length, num_docs=3):
  """Sorted random document ids 1..num_docs with a padding tail of segment 0."""
  rng = np.random.default_rng(seed)
  ids = np.sort(rng.integers(1, num_docs + 1, size=(batch, length)), axis=1)
  ids[:, length - length // 5:] = 0
  return jnp.asarray(ids, jnp.int32)


def alibi_slopes(num_heads):
  return 2.0 ** -(8.0 * jnp.arange(1, num_heads + 1, dtype=jnp.float32) / num_heads)


def bias_params(kind, num_heads):
  """Per-head parameters of a bias kind: (slopes,) or (r1, r2), distinct per head."""
  if kind == "alibi":
    return (alibi_slopes(num_heads),)
  if kind == "kerple_log":
    return jnp.linspace(0.5, 2.0, num_heads), jnp.linspace(0.2, 1.5, num_heads)
  return jnp.linspace(0.05, 0.5, num_heads), jnp.linspace(0.3, 1.8, num_heads)  # power


def make_positions(kind, seed, batch, length, segment_ids=None):
  """[B, L] int32 bias positions that differ from the indices.

  "shifted": 11 + index; "restarted": index within its segment (needs segment ids); "random":
  sorted random, non-contiguous (with repeats).
  """
  if kind == "shifted":
    return jnp.broadcast_to(11 + jnp.arange(length, dtype=jnp.int32), (batch, length))
  if kind == "restarted":
    ids = np.asarray(segment_ids)
    positions = np.zeros(ids.shape, np.int32)
    for i in range(1, length):  # a run of equal ids is one document
      positions[:, i] = np.where(ids[:, i] == ids[:, i - 1], positions[:, i - 1] + 1, 0)
    return jnp.asarray(positions)
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.sort(rng.integers(0, 3 * length, size=(batch, length)), axis=1),
                     jnp.int32)


@functools.partial(jax.jit, static_argnames=("fn",))
def outputs_and_grads(fn, q, k, v, params=()):
  """(out, lse) and d/d(q, k, v[, params]) of a loss that weights every output entry and lse.

  `fn(q, k, v)`, or `fn(q, k, v, params)` when bias parameters are given (their gradients are
  then appended to those of q, k, v).
  """

  def loss(q, k, v, *params):
    out, lse = fn(q, k, v, *params)
    w = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    w_lse = jnp.sin(jnp.arange(lse.size, dtype=jnp.float32)).reshape(lse.shape)
    # Rows that see no key have lse = -inf: leave them out of the loss.
    lse_term = jnp.where(jnp.isfinite(lse), lse * w_lse, 0.0).sum()
    return (out.astype(jnp.float32) * w).sum() + lse_term, (out, lse)

  args = (q, k, v, params) if params else (q, k, v)
  grads, (out, lse) = jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True)(*args)
  if params:
    grads = grads[:3] + tuple(grads[3])
  return out, lse, grads


def assert_close(test, actual, expected, tol, name):
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  test.assertEqual(actual.shape, expected.shape, name)
  np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg=name)
  finite = np.isfinite(expected)
  scale = max(1.0, float(np.abs(np.where(finite, expected, 0)).max(initial=0)))
  np.testing.assert_allclose(np.where(finite, actual, 0), np.where(finite, expected, 0),
                             atol=tol * scale, rtol=0, err_msg=name)
