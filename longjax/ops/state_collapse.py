"""Training-free state-collapse mitigations for decaying recurrences (Mamba, Mamba-2).

Chen et al., "Stuffed Mamba: State Collapse and State Capacity of RNN-Based Long-Context
Modeling" (2024), trace the failure of Mamba-style models beyond their training length to a
state that accumulates more than it learned to forget, and mitigate it at inference without
retraining. Besides forgetting faster (the mixers' `decay_scale`), two of their methods change
the recurrence itself, so they run here as one `lax.scan` over time:

  window w      the exact state of the last w steps, for a recurrence h_t = a_t h_{t-1} + x_t:
                h_t^(w) = h_t - (a_{t-w+1} ... a_t) h_{t-w}, computed as its own recurrence
                h_t^(w) = a_t h_{t-1}^(w) + x_t - (a_{t-w+1} ... a_t) x_{t-w}.
  norm_max τ    state normalisation: after each update, each channel's state is scaled down to
                norm τ when it is larger, h_t <- h_t min(1, τ / ||h_t||).

The recurrence: h_t = m_t exp(dt_t a) ⊙ h_{t-1} + write(x_t), y_t = read(h_t, x_t), with the
state [B, C, ...] (C decay channels: Mamba's inner channels, Mamba-2's heads), dt [B, T, C] and
a [C, ...] broadcast to the state, m_t = 0 where a document starts. The window's decay products
come from running sums of dt, differenced over the window (float32: a relative error of about
1e-7 times the sum's size in the exponent).
"""

import jax
import jax.numpy as jnp
from jax import lax


def _shift(x, w):
  """x [B, T, ...] delayed by w steps along T, zeros first."""
  pad = jnp.zeros_like(x[:, :w])
  return jnp.concatenate([pad, x[:, :-w]], axis=1) if w < x.shape[1] else jnp.zeros_like(x)


def _clip_norm(h, norm_max):
  """Scales each [b, c] slice of h down to Frobenius norm `norm_max` where it is larger."""
  axes = tuple(range(2, h.ndim))
  norm = jnp.sqrt(jnp.sum(h * h, axis=axes, keepdims=True))
  return h * jnp.minimum(1.0, norm_max / jnp.maximum(norm, 1e-30))


def decaying_scan(dt, a, write, read, inputs, *, keep=None, h0=None, window: int = 0,
                  norm_max: float = 0.0):
  """The recurrence of the module docstring with a window or state normalisation.

  Args:
    dt: [B, T, C] float32 step sizes (>= 0).
    a: [C, ...] float32 (<= 0): the log decay of step t is dt_t * a, broadcast to the state.
    write: x_t -> [B, C, ...] the input term of step t from `inputs`' slice at t (a pytree of
      [B, ...]); it must give zeros for all-zero inputs (the window's steps before the start).
    read: (h_t, x_t) -> y_t, any pytree of [B, ...].
    inputs: pytree of [B, T, ...] arrays, sliced per step for `write` and `read`.
    keep: [B, T] float32, 0 where a document starts (the state resets), or None.
    h0: [B, C, ...] initial state, or None (zeros). Not with a window: its steps are unknown.
    window: w > 0 keeps the last w steps only; 0 = off.
    norm_max: τ > 0 normalises the state after every step; 0 = off.

  Returns:
    (y stacked over T: [B, T, ...] per leaf, final state [B, C, ...] float32).
  """
  if window and norm_max:
    raise ValueError("a state window and state normalisation cannot be combined: the window's "
                     "subtraction is exact only for the plain recurrence")
  if window < 0 or norm_max < 0:
    raise ValueError(f"window={window} and norm_max={norm_max} must be >= 0 (0 = off)")
  if window and h0 is not None:
    raise ValueError("a state window needs the inputs of its last w steps, which an initial "
                     "state (a decode cache) does not hold: use it on whole sequences")
  bsz, t, channels = dt.shape
  keep = jnp.ones((bsz, t), jnp.float32) if keep is None else keep.astype(jnp.float32)
  extra = (1,) * (a.ndim - 1)
  decay = lambda dt_t, keep_t: (jnp.exp(dt_t.reshape(bsz, channels, *extra) * a)  # noqa: E731
                                * keep_t.reshape(bsz, 1, *extra))
  x_first = jax.tree.map(lambda x: x[:, 0], inputs)
  state_shape = jax.eval_shape(write, x_first).shape
  h = jnp.zeros(state_shape, jnp.float32) if h0 is None else h0.astype(jnp.float32)
  steps_first = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731

  if window:
    # The decay product over (t - w, t]: exp(a * (S_t - S_{t-w})), zero if a document starts
    # inside the window (the step leaving it was already forgotten).
    sums, resets = jnp.cumsum(dt, axis=1), jnp.cumsum(1.0 - keep, axis=1)
    window_dt = sums - _shift(sums, window)
    window_kept = (resets - _shift(resets, window) == 0).astype(jnp.float32)
    old = jax.tree.map(lambda x: _shift(x, window), inputs)
    xs = (steps_first(dt), steps_first(keep), jax.tree.map(steps_first, inputs),
          steps_first(window_dt), steps_first(window_kept), jax.tree.map(steps_first, old))

    def step(h, x):
      dt_t, keep_t, x_t, window_dt_t, window_kept_t, old_t = x
      h = (decay(dt_t, keep_t) * h + write(x_t)
           - decay(window_dt_t, window_kept_t) * write(old_t))
      return h, read(h, x_t)
  else:
    xs = (steps_first(dt), steps_first(keep), jax.tree.map(steps_first, inputs))

    def step(h, x):
      dt_t, keep_t, x_t = x
      h = decay(dt_t, keep_t) * h + write(x_t)
      if norm_max:
        h = _clip_norm(h, norm_max)
      return h, read(h, x_t)

  final, y = lax.scan(step, h, xs)
  return jax.tree.map(lambda v: jnp.moveaxis(v, 0, 1), y), final
