"""Selective scan kernels (interpret mode) against the lax.scan reference, forward and gradients.

Both kernel variants (Mosaic-TPU-style and Triton-style) run in the Pallas interpreter on CPU.
The reference is itself checked against a float64 loop over (batch, time, channel, state) in
numpy. Lowering for real TPUs and GPUs is in `selective_scan_lowering_test.py`.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.scan.kernel import selective_scan
from kernels_pallas.scan.kernel import selective_scan_reference

# Tolerance per dtype, relative to the largest magnitude of the compared array. f32: kernel and
# reference differ only in the order of a few f32 sums. bf16: both compute in f32 from the same
# bf16 inputs, so only the outputs' and gradients' final rounding differs (2^-8 ~ 4e-3 each).
TOLERANCES = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}

# Option sets: (length, chunk_size, block_d, kwargs). Lengths 37 and 5 need padding (37 over
# several chunks, 5 inside a single one); 32 is an exact multiple.
CONFIGS = {
    "plain": (37, 8, 8, dict()),
    "full": (32, 8, 8, dict(skip=True, bias=True, state=True)),
    "grouped": (37, 16, 4, dict(groups=2, bias=True, state=True)),
    "no_softplus": (5, 8, 16, dict(skip=True, state=True, softplus=False)),
}


def random_inputs(seed, batch, length, channels, state, dtype, *, groups=None, skip=False,
                  bias=False, state_in=False, softplus=True):
  """Positional (u, delta, A, B, C, D) and keyword arguments of a stable scan."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
  bc_shape = (batch, length, state) if groups is None else (batch, length, groups, state)
  # softplus(N(0, 1) - 0.5) keeps dt around 0.5; without it, dt = |delta| must be positive.
  delta = normal(batch, length, channels) - 0.5 if softplus else 0.5 * np.abs(
      normal(batch, length, channels))
  args = (jnp.asarray(normal(batch, length, channels), dtype), jnp.asarray(delta, dtype),
          jnp.asarray(-np.exp(normal(channels, state))),
          jnp.asarray(normal(*bc_shape), dtype), jnp.asarray(normal(*bc_shape), dtype),
          jnp.asarray(normal(channels)) if skip else None)
  kwargs = dict(delta_softplus=softplus)
  if bias:
    kwargs["delta_bias"] = jnp.asarray(0.3 * normal(channels))
  if state_in:
    kwargs["initial_state"] = jnp.asarray(normal(batch, channels, state))
  return args, kwargs


def config_inputs(name, dtype, seed=0):
  length, chunk, block_d, opts = CONFIGS[name]
  args, kwargs = random_inputs(seed, 2, length, 16, 4, dtype, groups=opts.get("groups"),
                               skip=opts.get("skip", False), bias=opts.get("bias", False),
                               state_in=opts.get("state", False),
                               softplus=opts.get("softplus", True))
  return args, kwargs, dict(chunk_size=chunk, block_d=block_d)


def assert_close(test, actual, expected, tol, name):
  actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
  test.assertEqual(actual.shape, expected.shape, name)
  scale = max(1.0, float(np.abs(expected).max(initial=0)))
  np.testing.assert_allclose(actual, expected, atol=tol * scale, rtol=0, err_msg=name)


# The forms jitted once for the module (one compiled program per call signature, shared by the
# kernel variants' cases) instead of one program per op.
jit_reference = jax.jit(selective_scan_reference,
                        static_argnames=("delta_softplus", "return_final_state"))
jit_kernel = jax.jit(selective_scan, static_argnames=(
    "delta_softplus", "chunk_size", "block_d", "return_final_state", "interpret", "backend"))


@functools.partial(jax.jit, static_argnames=("fn", "num_args", "positions", "flags"))
def _grads_of_loss(arrays, extra, *, fn, num_args, positions, flags):
  """`loss_and_grads`' compiled part: static in `fn` and the call's layout, so that the reference
  (one function object) compiles once for the cases of both kernel variants."""

  def loss(arrays, extra):
    full = [None] * num_args
    for i, x in zip(positions, arrays):
      full[i] = x
    y, h = fn(*full, **dict(flags), **extra)
    wy = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    wh = jnp.sin(jnp.arange(h.size, dtype=jnp.float32)).reshape(h.shape)
    return (y.astype(jnp.float32) * wy).sum() + (h * wh).sum(), (y, h)

  return jax.grad(loss, argnums=(0, 1), has_aux=True)(arrays, extra)


def loss_and_grads(fn, args, kwargs):
  """(y, h_L) and the gradients of a loss weighting every entry of both, w.r.t. every array
  argument (positional and keyword)."""
  names = [k for k in ("delta_bias", "initial_state") if k in kwargs]
  flags = tuple(sorted((k, v) for k, v in kwargs.items() if k not in names))
  positions = tuple(i for i, x in enumerate(args) if x is not None)
  (grads, extra_grads), (y, h) = _grads_of_loss(
      [args[i] for i in positions], {k: kwargs[k] for k in names}, fn=fn, num_args=len(args),
      positions=positions, flags=flags)
  labels = [("u", "delta", "A", "B", "C", "D")[i] for i in positions] + names
  return y, h, dict(zip(labels, list(grads) + [extra_grads[k] for k in names]))


def naive_scan(u, delta, a, b, c, d_skip, bias, softplus, h0):
  """Loops over (batch, time, channel, state) in float64: the definition, as plainly as
  possible."""
  u, delta, a, b, c = (np.asarray(x, np.float64) for x in (u, delta, a, b, c))
  bt, length, dm = u.shape
  if b.ndim == 3:
    b, c = b[:, :, None], c[:, :, None]
  per_group = dm // b.shape[2]
  h = np.array(h0, np.float64)
  y = np.zeros(u.shape)
  for i in range(bt):
    for t in range(length):
      for d in range(dm):
        x = delta[i, t, d] + bias[d]
        dt = np.log1p(np.exp(x)) if softplus else x
        for n in range(a.shape[1]):
          h[i, d, n] = (np.exp(dt * a[d, n]) * h[i, d, n]
                        + dt * b[i, t, d // per_group, n] * u[i, t, d])
          y[i, t, d] += c[i, t, d // per_group, n] * h[i, d, n]
        y[i, t, d] += d_skip[d] * u[i, t, d]
  return y, h


class SelectiveScanTest(parameterized.TestCase):

  def test_reference_matches_naive_loop(self):
    args, kwargs = random_inputs(1, 2, 6, 4, 3, jnp.float32, groups=2, skip=True, bias=True,
                                 state_in=True)
    y, h = jit_reference(*args, **kwargs)
    y_naive, h_naive = naive_scan(*args, kwargs["delta_bias"], True, kwargs["initial_state"])
    assert_close(self, y, y_naive, 1e-5, "y")
    assert_close(self, h, h_naive, 1e-5, "h")

  @parameterized.product(variant=("tpu", "gpu"), config=tuple(CONFIGS),
                         dtype=(jnp.float32, jnp.bfloat16))
  def test_forward(self, variant, config, dtype):
    args, kwargs, blocks = config_inputs(config, dtype)
    y, h = jax.jit(functools.partial(selective_scan, backend=variant, **blocks, **kwargs))(
        *args)
    y_ref, h_ref = jit_reference(*args, **kwargs)
    self.assertEqual(y.dtype, dtype)
    self.assertEqual(h.dtype, jnp.float32)
    assert_close(self, y, y_ref, TOLERANCES[dtype], "y")
    assert_close(self, h, h_ref, TOLERANCES[jnp.float32], "final state")

  @parameterized.named_parameters(
      dict(testcase_name=f"{variant}_{config}_{jnp.dtype(dtype).name}", variant=variant,
           config=config, dtype=dtype)
      for variant in ("tpu", "gpu")
      for config, dtype in (("full", jnp.float32), ("grouped", jnp.float32),
                            ("no_softplus", jnp.float32), ("full", jnp.bfloat16)))
  def test_gradients(self, variant, config, dtype):
    args, kwargs, blocks = config_inputs(config, dtype)
    y, h, grads = loss_and_grads(functools.partial(selective_scan, backend=variant, **blocks),
                                 args, kwargs)
    y_ref, h_ref, grads_ref = loss_and_grads(selective_scan_reference, args, kwargs)
    assert_close(self, y, y_ref, TOLERANCES[dtype], "y")
    assert_close(self, h, h_ref, TOLERANCES[dtype], "h")
    self.assertEqual(set(grads), set(grads_ref))
    for name, grad in grads.items():
      self.assertEqual(grad.dtype, grads_ref[name].dtype, name)
      self.assertGreater(float(jnp.abs(grads_ref[name].astype(jnp.float32)).max()), 0, name)
      assert_close(self, grad, grads_ref[name], TOLERANCES[dtype], f"d{name}")

  @parameterized.parameters("tpu", "gpu")
  def test_state_passing_equals_one_call(self, variant):
    # The sequence-parallel / prefill-then-continue identity: a call that starts from the
    # previous call's final state continues the same recurrence.
    args, kwargs = random_inputs(2, 2, 21, 16, 4, jnp.float32, skip=True, bias=True,
                                 state_in=True)
    scan = functools.partial(jit_kernel, backend=variant, chunk_size=8, block_d=8)
    y, h = scan(*args, **kwargs)
    u, delta, a, b, c, d_skip = args
    split = 13
    first = lambda x: x[:, :split]  # noqa: E731
    second = lambda x: x[:, split:]  # noqa: E731
    y1, h1 = scan(first(u), first(delta), a, first(b), first(c), d_skip, **kwargs)
    y2, h2 = scan(second(u), second(delta), a, second(b), second(c), d_skip,
                  **{**kwargs, "initial_state": h1})
    assert_close(self, jnp.concatenate([y1, y2], axis=1), y, 1e-5, "y")
    assert_close(self, h2, h, 1e-5, "final state")

  @parameterized.parameters("tpu", "gpu")
  def test_length_one_is_a_decode_step(self, variant):
    (u, delta, a, b, c, d_skip), kwargs = random_inputs(3, 2, 1, 16, 4, jnp.float32, skip=True,
                                                         bias=True, state_in=True)
    y, h = jit_kernel(u, delta, a, b, c, d_skip, backend=variant, block_d=8, **kwargs)
    dt = jax.nn.softplus(delta[:, 0] + kwargs["delta_bias"])  # [Bt, D]
    h_step = (jnp.exp(dt[..., None] * a) * kwargs["initial_state"]
              + (dt * u[:, 0])[..., None] * b[:, 0, None, :])
    y_step = jnp.einsum("bdn,bn->bd", h_step, c[:, 0]) + d_skip * u[:, 0]
    assert_close(self, y[:, 0], y_step, 1e-5, "y")
    assert_close(self, h, h_step, 1e-5, "state")

  @parameterized.parameters("tpu", "gpu")
  def test_default_blocks_and_odd_sizes(self, variant):
    # D = 20 channels and P = 3 states pad to the variant's tiles (and to a power of two on
    # GPU); the defaults pick the chunk and channel block.
    args, kwargs = random_inputs(4, 1, 19, 20, 3, jnp.float32, skip=True, state_in=True)
    y = jit_kernel(*args, backend=variant, return_final_state=False, **kwargs)
    y_ref = jit_reference(*args, return_final_state=False, **kwargs)
    assert_close(self, y, y_ref, 1e-5, "y")

  def test_rejects_bad_inputs(self):
    (u, delta, a, b, c, _), _ = random_inputs(0, 1, 8, 16, 4, jnp.float32)
    with self.assertRaisesRegex(ValueError, "A must be"):
      selective_scan(u, delta, a.T, b, c)
    with self.assertRaisesRegex(ValueError, "split evenly"):
      selective_scan(u, delta, a, b.reshape(1, 8, 1, 4).repeat(3, axis=2),
                     c.reshape(1, 8, 1, 4).repeat(3, axis=2))
    with self.assertRaisesRegex(ValueError, "TPU kernels need"):
      selective_scan(u, delta, a, b, c, backend="tpu", interpret=False, block_d=16)


if __name__ == "__main__":
  absltest.main()
