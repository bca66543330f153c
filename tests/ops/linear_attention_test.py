"""Tests for longjax.ops.linear_attention.

The recurrent form is checked against a float64 numpy loop that spells out the recurrence (decay,
document resets, initial state, normalisation); the reference, chunked and Pallas forms against
the recurrent one, forward and gradients; packed documents against each document alone.
"""

import dataclasses
import functools
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from longjax.ops import dispatch
from longjax.ops import linear_attention as la

# (atol, rtol) between forms on outputs of order 1: float32 differs in summation order only;
# bfloat16 inputs are rounded once (the arithmetic inside is float32 in every form).
TOLERANCES = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (2e-2, 2e-2)}
B, T, N, DK, DV = 2, 11, 2, 4, 3
# One compiled program per configuration (eagerly, every primitive of the forms compiles alone).
_op = jax.jit(la.linear_attention, static_argnames=("normalize", "scale", "impl", "chunk_size"))


def _inputs(seed=0, dtype=jnp.float32, t=T, decay="step", segments=False, state=False,
            normalize=False, feature="elu1"):
  rng = np.random.default_rng(seed)
  q, k = (la.FEATURE_MAPS[feature](jnp.asarray(rng.normal(size=(B, t, N, DK)), jnp.float32))
          for _ in range(2))
  v = jnp.asarray(rng.normal(size=(B, t, N, DV)), jnp.float32)
  log_decay = {"none": None, "head": jnp.asarray(np.log([0.9, 0.6]), jnp.float32),
               "step": jnp.asarray(-rng.uniform(0.0, 0.5, size=(B, t, N)), jnp.float32),
               # per key channel (GLA), some channels decaying fast (a = e^-4 per step)
               "channel": jnp.asarray(-rng.uniform(0.0, 4.0, size=(B, t, N, DK)),
                                      jnp.float32)}[decay]
  segment_ids = None
  if segments:  # row 0: three documents; row 1: one document starting at 0 and a second one
    segment_ids = jnp.asarray([[0] * 3 + [1] * (t - 7) + [2] * 4, [5] * (t - 2) + [6] * 2])
  initial_state = None
  if state:
    shape = la.state_shape(B, N, DK, DV, normalize)
    initial_state = jnp.asarray(np.abs(rng.normal(size=shape)), jnp.float32)
  return dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype), log_decay=log_decay,
              segment_ids=segment_ids, initial_state=initial_state, normalize=normalize)


def _numpy_loop(q, k, v, log_decay, segment_ids, initial_state, normalize, scale=1.0):
  """The recurrence, one (batch, head, step) at a time in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, n, dk = q.shape
  dv = v.shape[-1]
  out = np.zeros((b, t, n, dv))
  finals = np.zeros((b, n, dk, dv + int(normalize)))
  for i in range(b):
    for h in range(n):
      state = (np.zeros((dk, dv + int(normalize))) if initial_state is None
               else np.asarray(initial_state, np.float64)[i, h])
      for s in range(t):
        a = np.ones((dk, 1))  # the factor of each state row (key channel)
        if log_decay is not None:
          g = np.asarray(log_decay, np.float64)
          a = a * np.exp({1: lambda: g[h], 3: lambda: g[i, s, h],
                          4: lambda: g[i, s, h][:, None]}[g.ndim]())
        if segment_ids is not None and s > 0 and segment_ids[i, s] != segment_ids[i, s - 1]:
          a = 0.0 * a
        value = np.append(v[i, s, h], 1.0) if normalize else v[i, s, h]
        state = a * state + np.outer(k[i, s, h], value)
        o = scale * q[i, s, h] @ state
        out[i, s, h] = o[:dv] / (o[dv] + la.NORMALIZER_EPS) if normalize else o
      finals[i, h] = state
  return out, finals


class FormsTest(parameterized.TestCase):

  # Each option alone and together (every combination would compile 24 programs).
  @parameterized.parameters(("none", False, False, False), ("head", True, True, True),
                            ("step", True, False, True), ("step", False, True, False),
                            ("channel", True, True, True))
  def test_recurrent_equals_a_numpy_loop(self, decay, segments, state, normalize):
    args = _inputs(decay=decay, segments=segments, state=state, normalize=normalize)
    out, final = _op(**args, impl="recurrent", scale=0.5)
    want_out, want_final = _numpy_loop(**{k: None if v is None else np.asarray(v)
                                          for k, v in args.items() if k != "normalize"},
                                       normalize=normalize, scale=0.5)
    np.testing.assert_allclose(out, want_out, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(final, want_final, atol=2e-5, rtol=2e-5)

  @parameterized.product(impl=("reference", "chunked"),
                         options=(("none", False, False), ("step", True, True),
                                  ("channel", True, True)))
  def test_forms_equal_the_recurrence_forward_and_gradients(self, impl, options):
    decay, segments, normalize = options
    args = _inputs(seed=1, decay=decay, segments=segments, state=True, normalize=normalize)
    # Chunks of 4 over T=11: a padded last chunk and documents that cross chunk edges.
    kwargs = {"chunk_size": 4} if impl == "chunked" else {}
    self._check_against_recurrent(args, impl, kwargs)

  @parameterized.parameters("head", "channel")
  def test_blocks_of_the_chunked_form(self, decay):
    # Blocks of 8 steps over T = 23 (padded to 24), chunks of 4: documents and the state cross
    # block edges; forward and gradients against the recurrence.
    args = _inputs(seed=6, t=23, decay=decay, segments=True, state=True, normalize=True)
    diff = {k: args[k] for k in ("q", "k", "v", "log_decay", "initial_state")}
    weights = np.random.default_rng(1).normal(size=(B, 23, N, DV)).astype(np.float32)

    def loss(impl, diff):
      out, final = la.linear_attention(**diff, segment_ids=args["segment_ids"], normalize=True,
                                       impl=impl, chunk_size=4)
      return jnp.sum(out * weights) + jnp.sum(jnp.sin(final)), (out, final)

    with mock.patch.object(la, "BLOCK", 8):
      got = jax.jit(jax.grad(functools.partial(loss, "chunked"), has_aux=True))(diff)
    want = jax.jit(jax.grad(functools.partial(loss, "recurrent"), has_aux=True))(diff)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)

  def test_chunk_sizes_one_and_longer_than_the_sequence(self):
    args = _inputs(seed=2, decay="head", segments=True, state=True)
    want = _op(**args, impl="recurrent")
    for chunk in (1, 3, 11, 16):
      got = _op(**args, impl="chunked", chunk_size=chunk)
      for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5, err_msg=f"chunk={chunk}")

  @parameterized.parameters("step", "channel")
  def test_pallas_kernel_equals_the_recurrence(self, decay):
    # The kernel has no resets: a batch without segment ids, with a decay and a state.
    args = _inputs(seed=3, decay=decay, state=True, normalize=True)
    self._check_against_recurrent(args, "pallas", {"chunk_size": 8})

  @parameterized.parameters(jnp.bfloat16, jnp.float32)
  def test_dtypes(self, dtype):
    args = _inputs(seed=4, dtype=dtype, decay="step", segments=True, state=True)
    got, want = (_op(**args, impl=impl) for impl in ("chunked", "reference"))
    self.assertEqual(got[0].dtype, dtype)
    self.assertEqual(got[1].dtype, jnp.float32)
    atol, rtol = TOLERANCES[dtype]
    for g, w in zip(got, want):
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                 atol=atol, rtol=rtol)

  def _check_against_recurrent(self, args, impl, kwargs):
    def run(name, q, k, v, log_decay=None, initial_state=None, **extra):
      out, final = _op(q, k, v, log_decay=log_decay, initial_state=initial_state,
                                       segment_ids=args["segment_ids"],
                                       normalize=args["normalize"], impl=name, scale=0.7,
                                       **extra)
      return out, final

    diff = {k: args[k] for k in ("q", "k", "v", "log_decay", "initial_state")
            if args[k] is not None}
    got = run(impl, **diff, **kwargs)
    want = run("recurrent", **diff)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, atol=2e-5, rtol=2e-5)
    rng = np.random.default_rng(9)
    weights = [jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in want]

    def loss(name, extra, diff):
      return sum(jnp.sum(w * x) for w, x in zip(weights, run(name, **diff, **extra)))

    grads = jax.grad(functools.partial(loss, impl, kwargs))(diff)
    grads_want = jax.grad(functools.partial(loss, "recurrent", {}))(diff)
    for name in diff:
      np.testing.assert_allclose(grads[name], grads_want[name], atol=1e-4, rtol=1e-4,
                                 err_msg=name)


class DocumentsTest(absltest.TestCase):

  def test_packed_documents_equal_each_document_alone(self):
    rng = np.random.default_rng(5)
    lengths = (4, 5, 3)
    docs = [tuple(jnp.asarray(rng.normal(size=(1, n, N, d)), jnp.float32)
                  for d in (DK, DK, DV)) for n in lengths]
    decay = jnp.asarray(np.log([0.8, 0.95]), jnp.float32)
    packed = [jnp.concatenate([d[i] for d in docs], axis=1) for i in range(3)]
    segment_ids = jnp.asarray([sum(([j] * n for j, n in enumerate(lengths)), [])])
    for impl in ("chunked", "reference", "recurrent"):
      out, final = _op(*packed, log_decay=decay, segment_ids=segment_ids,
                                       normalize=True, impl=impl, chunk_size=4)
      start = 0
      for (q, k, v), n in zip(docs, lengths):
        alone, alone_final = _op(q, k, v, log_decay=decay, normalize=True,
                                                 impl="recurrent")
        np.testing.assert_allclose(out[:, start:start + n], alone, atol=2e-5, rtol=2e-5,
                                   err_msg=impl)
        start += n
      np.testing.assert_allclose(final, alone_final, atol=2e-5, rtol=2e-5, err_msg=impl)

  def test_prefill_then_steps_equals_one_pass(self):
    # The decode path: a prefix, then one token at a time from the carried state.
    args = _inputs(seed=6, decay="step", normalize=True)
    want, want_final = _op(**args, impl="chunked", chunk_size=4)
    cut = 6
    part = lambda x, lo, hi: None if x is None else x[:, lo:hi]
    state = None
    outs = []
    for lo, hi in [(0, cut)] + [(s, s + 1) for s in range(cut, T)]:
      out, state = _op(
          part(args["q"], lo, hi), part(args["k"], lo, hi), part(args["v"], lo, hi),
          log_decay=part(args["log_decay"], lo, hi), initial_state=state, normalize=True)
      outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(state, want_final, atol=2e-5, rtol=2e-5)


class FeatureMapTest(absltest.TestCase):

  def test_taylor2_dot_products_are_exp_to_second_order(self):
    rng = np.random.default_rng(7)
    q, k = rng.normal(size=(5, 16)), rng.normal(size=(5, 16))
    got = np.sum(np.asarray(la.taylor2_features(jnp.asarray(q)), np.float64)
                 * np.asarray(la.taylor2_features(jnp.asarray(k)), np.float64), axis=-1)
    u = np.sum(q * k, axis=-1) / 4.0  # sqrt(F) = 4
    np.testing.assert_allclose(got, 1 + u + u * u / 2, rtol=1e-5)
    self.assertEqual(la.feature_size("taylor2", 16), 273)


class DispatchTest(absltest.TestCase):

  def test_auto_and_forced_choices(self):
    call = la.LinearAttentionCall(length=4096, has_segments=False, decay="head")
    self.assertEqual(dispatch.resolve(la.LINEAR_ATTENTION, "auto", call, backend="cpu").impl,
                     "chunked")
    for backend in ("gpu", "tpu"):
      self.assertEqual(dispatch.resolve(la.LINEAR_ATTENTION, "auto", call,
                                        backend=backend).impl, "pallas")
    packed = dataclasses.replace(call, has_segments=True)
    resolution = dispatch.resolve(la.LINEAR_ATTENTION, "auto", packed, backend="tpu")
    self.assertEqual(resolution.impl, "chunked")
    self.assertIn("segment_ids", resolution.reason)
    with self.assertRaisesRegex(ValueError, "impl='pallas' cannot serve .*segment_ids"):
      dispatch.resolve(la.LINEAR_ATTENTION, "pallas", packed, backend="cpu")
    per_channel = dataclasses.replace(call, decay="channel")  # GLA: the kernel has it too
    self.assertEqual(dispatch.resolve(la.LINEAR_ATTENTION, "auto", per_channel,
                                      backend="gpu").impl, "pallas")

  def test_bad_shapes_name_the_argument(self):
    args = _inputs()
    with self.assertRaisesRegex(ValueError,
                                r"log_decay must be \[N=2\], .* or \[B, T, N, Dk=4\]"):
      _op(args["q"], args["k"], args["v"], log_decay=jnp.zeros(3))
    with self.assertRaisesRegex(ValueError, r"initial_state must be \[2, 2, 4, 4\]"):
      _op(args["q"], args["k"], args["v"], normalize=True,
                          initial_state=jnp.zeros((B, N, DK, DV)))


if __name__ == "__main__":
  absltest.main()
