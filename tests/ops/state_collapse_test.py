"""Stuffed Mamba's state window and state normalisation (`longjax.ops.state_collapse`) against
float64 numpy written from their definitions: the window as the sum over the last w steps
recomputed from scratch at every step, the normalisation as the clipped recurrence; then both
through the `mamba` and `mamba2` mixers, with their config errors."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

from longjax import configuration
from longjax.layers import mamba
from longjax.layers import mamba2
from longjax.ops import selective_scan
from longjax.ops import state_collapse
from tests import testing

B, T, E, N = 2, 13, 3, 4


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return dict(u=rng.normal(size=(B, T, E)), dt=rng.uniform(0.05, 0.6, size=(B, T, E)),
              b=rng.normal(size=(B, T, N)), c=rng.normal(size=(B, T, N)),
              a=-rng.uniform(0.2, 2.0, size=(E, N)))


def _keep(segment_ids):
  keep = np.ones(segment_ids.shape)
  keep[:, 1:] = segment_ids[:, 1:] == segment_ids[:, :-1]
  return keep


def _numpy_window(u, dt, b, c, a, keep, window):
  """y_t = C_t · sum over s in (t - w, t] of (prod_{r=s+1..t} a_r) x_s, from scratch per t;
  nothing before the last document start counts."""
  y = np.zeros((B, T, E))
  for i in range(B):
    for t in range(T):
      h = np.zeros((E, N))
      for s in range(max(0, t - window + 1), t + 1):
        if keep[i, s] == 0:
          h = np.zeros((E, N))  # a document starts at s: nothing before it survives
        h = np.exp(dt[i, s][:, None] * a) * h + (dt[i, s] * u[i, s])[:, None] * b[i, s]
      y[i, t] = h @ c[i, t]
  return y


def _numpy_normalised(u, dt, b, c, a, keep, norm_max):
  y, h = np.zeros((B, T, E)), np.zeros((B, E, N))
  for i in range(B):
    for t in range(T):
      h[i] = keep[i, t] * np.exp(dt[i, t][:, None] * a) * h[i] + \
          (dt[i, t] * u[i, t])[:, None] * b[i, t]
      norms = np.linalg.norm(h[i], axis=1, keepdims=True)
      h[i] = h[i] * np.minimum(1.0, norm_max / norms)
      y[i, t] = h[i] @ c[i, t]
  return y, h


def _scan(x, keep, **options):
  f32 = {k: jnp.asarray(v, jnp.float32) for k, v in x.items()}
  return state_collapse.decaying_scan(
      f32["dt"], f32["a"], lambda w: (w["dt"] * w["u"])[..., None] * w["b"][:, None, :],
      lambda h, r: jnp.sum(h * r["c"][:, None, :], axis=-1),
      {k: f32[k] for k in ("u", "dt", "b")}, {"c": f32["c"]},
      keep=None if keep is None else jnp.asarray(keep, jnp.float32), **options)


class DecayingScanTest(parameterized.TestCase):

  @parameterized.parameters(1, 4, 12)
  def test_window_equals_the_sum_over_the_last_w_steps(self, window):
    x = _inputs()
    keep = _keep(np.asarray([[0] * 5 + [1] * 8, [0] * T]))
    y, _, _ = _scan(x, keep, window=window)
    # f32 recurrence with a subtraction per step against a from-scratch float64 sum.
    np.testing.assert_allclose(y, _numpy_window(**x, keep=keep, window=window), atol=2e-5,
                               rtol=2e-5)

  def test_window_longer_than_the_sequence_is_the_plain_scan(self):
    x = _inputs(seed=1)
    keep = np.ones((B, T))
    y, final, _ = _scan(x, keep, window=T)
    want_y, want_final = selective_scan.selective_scan(
        *(jnp.asarray(x[k], jnp.float32) for k in ("u",)),
        jnp.log(jnp.expm1(jnp.asarray(x["dt"], jnp.float32))),  # softplus^-1: the op's dt
        *(jnp.asarray(x[k], jnp.float32) for k in ("a", "b", "c")), impl="recurrent")
    np.testing.assert_allclose(y, want_y, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(final, want_final, atol=1e-5, rtol=1e-5)

  def test_normalised_state_equals_the_clipped_recurrence(self):
    x = _inputs(seed=2)
    keep = _keep(np.asarray([[0] * 9 + [1] * 4, [0] * T]))
    y, final, _ = _scan(x, keep, norm_max=0.7)
    want_y, want_final = _numpy_normalised(**x, keep=keep, norm_max=0.7)
    np.testing.assert_allclose(y, want_y, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(final, want_final, atol=2e-5, rtol=2e-5)
    self.assertLessEqual(float(jnp.max(jnp.linalg.norm(final, axis=-1))), 0.7 + 1e-6)

  def test_bad_options(self):
    x = _inputs()
    keep = np.ones((B, T))
    with self.assertRaisesRegex(ValueError, "cannot be combined"):
      _scan(x, keep, window=3, norm_max=1.0)
    with self.assertRaisesRegex(ValueError, "needs that state's window history"):
      _scan(x, keep, window=3, h0=jnp.zeros((B, E, N)))

  def test_window_continues_from_its_history(self):
    # Three calls of 6, 1 and 6 steps, each from the previous call's state and history, equal
    # one call over the 13 steps (one sequence per row: no resets).
    x = _inputs(seed=5)
    whole, final, _ = _scan(x, None, window=4)
    h, history, pieces = None, None, []
    for start, stop in ((0, 6), (6, 7), (7, T)):
      part = {k: (v[:, start:stop] if k != "a" else v) for k, v in x.items()}
      y, h, history = _scan(part, None, window=4, h0=h, history=history)
      pieces.append(y)
    np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), whole, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, final, atol=1e-5, rtol=1e-5)


def _layer(module, **options):
  if module is mamba:
    return mamba.Mamba(16, state_dim=4, **options, rngs=nnx.Rngs(0))
  return mamba2.Mamba2(16, state_dim=4, head_dim=8, **options, rngs=nnx.Rngs(0))


class MixerMitigationsTest(parameterized.TestCase):

  @parameterized.parameters(mamba, mamba2)
  def test_window_changes_only_outputs_past_the_window(self, module):
    # Before step w the window holds every step so far: outputs equal the plain mixer's.
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 12, 16)), jnp.float32)
    positions = jnp.arange(12)[None]
    plain, _ = _layer(module)(x, positions=positions)
    windowed, _ = _layer(module, state_window=5)(x, positions=positions)
    np.testing.assert_allclose(windowed[:, :5], plain[:, :5], atol=2e-5, rtol=2e-5)
    self.assertGreater(float(jnp.max(jnp.abs(windowed[:, 5:] - plain[:, 5:]))), 1e-4)

  @parameterized.product(module=(mamba, mamba2),
                         options=({"state_norm_max": 0.05}, {"state_window": 3}))
  def test_prefill_then_token_by_token_decode_equals_the_full_pass(self, module, options):
    layer = _layer(module, **options)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(1, 8, 16)), jnp.float32)
    positions = jnp.arange(8)[None]
    full, _ = layer(x, positions=positions)
    cache = layer.init_cache(1, 8)
    y, cache = layer(x[:, :2], positions=positions[:, :2], cache=cache)  # prefill 2 tokens
    steps = [y]
    for t in range(2, 8):
      y, cache = layer(x[:, t:t + 1], positions=positions[:, t:t + 1], cache=cache)
      steps.append(y)
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, atol=2e-5, rtol=2e-5)
    plain, _ = _layer(module)(x, positions=positions)
    self.assertGreater(float(jnp.max(jnp.abs(full - plain))), 1e-4)  # the option is active

  @parameterized.parameters(("mamba", {"state_window": -1}, "state_window", ">= 0"),
                            ("mamba2", {"state_norm_max": -0.5}, "state_norm_max", ">= 0"),
                            ("mamba", {"state_window": 8, "state_norm_max": 1.0},
                             "state_norm_max", "cannot be combined"))
  def test_config_errors(self, name, fields, field, fragment):
    cfg = testing.tiny_config(**{"model.mixers": name,
                                 **{f"model.{name}.{k}": v for k, v in fields.items()}})
    with self.assertRaisesRegex(configuration.ConfigError, rf"model\.{name}\.{field}=.*{fragment}"):
      configuration.validate(cfg, 1)


if __name__ == "__main__":
  absltest.main()
