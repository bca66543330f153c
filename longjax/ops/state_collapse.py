"""Training-free state-collapse mitigations for decaying recurrences (Mamba, Mamba-2).

Chen et al., "Stuffed Mamba: State Collapse and State Capacity of RNN-Based Long-Context
Modeling" (2024), trace the failure of Mamba-style models beyond their training length to a
state that accumulates more than it learned to forget, and mitigate it at inference without
retraining. Besides forgetting faster (the mixers' `decay_scale`), two of their methods change
the recurrence itself, so they run here as one `lax.scan` over time:

  window w      the exact state of the last w steps, for a recurrence h_t = a_t h_{t-1} + x_t:
                h_t^(w) = h_t - (a_{t-w+1} ... a_t) h_{t-w}, computed as its own recurrence
                h_t^(w) = a_t h_{t-1}^(w) + x_t - (a_{t-w+1} ... a_t) x_{t-w}; decoding
                carries the last w steps' inputs (a history of O(w), constant in the length).
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


def _clip_norm(h, norm_max):
  """Scales each [b, c] slice of h down to Frobenius norm `norm_max` where it is larger."""
  axes = tuple(range(2, h.ndim))
  norm = jnp.sqrt(jnp.sum(h * h, axis=axes, keepdims=True))
  return h * jnp.minimum(1.0, norm_max / jnp.maximum(norm, 1e-30))


def empty_history(window: int, dt_like, writes_like) -> dict:
  """A window history of `window` steps before the start: zeros (no input, no decay).

  dt_like: [B, T, C] and writes_like: a pytree of [B, T, ...] (or shape structs) give the
  shapes past T. Returns {"dt": [B, w, C], "writes": pytree of [B, w, ...]}, float32.
  """
  zeros = lambda x: jnp.zeros((x.shape[0], window, *x.shape[2:]), jnp.float32)  # noqa: E731
  return {"dt": zeros(dt_like), "writes": jax.tree.map(zeros, writes_like)}


def decaying_scan(dt, a, write, read, writes, reads, *, keep=None, h0=None, window: int = 0,
                  history=None, norm_max: float = 0.0):
  """The recurrence of the module docstring with a window or state normalisation.

  Args:
    dt: [B, T, C] float32 step sizes (>= 0).
    a: [C, ...] float32 (<= 0): the log decay of step t is dt_t * a, broadcast to the state.
    write: w_t -> [B, C, ...] the input term of step t from `writes`' slice at t (a pytree of
      [B, ...]); zeros for all-zero inputs (the empty history's steps).
    read: (h_t, r_t) -> y_t, any pytree of [B, ...], from `reads`' slice at t.
    writes, reads: pytrees of [B, T, ...] arrays.
    keep: [B, T] float32, 0 where a document starts (the state resets), or None.
    h0: [B, C, ...] initial state, or None (zeros).
    window: w > 0 keeps the last w steps only; 0 = off.
    history: with a window and `h0`, the w steps before this call (`empty_history`'s layout,
      the previous call's third result): the inputs the window subtracts again.
    norm_max: τ > 0 normalises the state after every step; 0 = off.

  Returns:
    (y stacked over T: [B, T, ...] per leaf, final state [B, C, ...] float32, the last w
    steps' history with a window, else None).
  """
  if window and norm_max:
    raise ValueError("a state window and state normalisation cannot be combined: the window's "
                     "subtraction is exact only for the plain recurrence")
  if window < 0 or norm_max < 0:
    raise ValueError(f"window={window} and norm_max={norm_max} must be >= 0 (0 = off)")
  if window and h0 is not None and history is None:
    raise ValueError("a state window continued from a state needs that state's window history "
                     "(the inputs it subtracts again)")
  bsz, t, channels = dt.shape
  keep = jnp.ones((bsz, t), jnp.float32) if keep is None else keep.astype(jnp.float32)
  extra = (1,) * (a.ndim - 1)
  decay = lambda dt_t, keep_t: (jnp.exp(dt_t.reshape(bsz, channels, *extra) * a)  # noqa: E731
                                * keep_t.reshape(bsz, 1, *extra))
  state_shape = jax.eval_shape(write, jax.tree.map(lambda x: x[:, 0], writes)).shape
  h = jnp.zeros(state_shape, jnp.float32) if h0 is None else h0.astype(jnp.float32)
  steps_first = lambda x: jnp.moveaxis(x, 1, 0)  # noqa: E731
  new_history = None

  if window:
    history = empty_history(window, dt, writes) if history is None else history
    # Step t's window is (t - w, t]: with the history in front, step t sits at w + t and the
    # step leaving its window at t. The decay product over the window is exp(a * (sum of its
    # dt)), zero if a document starts inside it (the leaving step was already forgotten).
    dt_all = jnp.concatenate([history["dt"], dt], axis=1)
    writes_all = jax.tree.map(lambda old, new: jnp.concatenate([old, new], axis=1),
                              history["writes"], writes)
    sums = jnp.cumsum(dt_all, axis=1)
    resets = jnp.cumsum(jnp.concatenate([jnp.zeros((bsz, window)), 1.0 - keep], axis=1), axis=1)
    window_dt = sums[:, window:] - sums[:, :t]
    window_kept = (resets[:, window:] - resets[:, :t] == 0).astype(jnp.float32)
    leaving = jax.tree.map(lambda x: x[:, :t], writes_all)
    new_history = {"dt": dt_all[:, -window:],
                   "writes": jax.tree.map(lambda x: x[:, -window:], writes_all)}
    xs = (steps_first(dt), steps_first(keep), jax.tree.map(steps_first, writes),
          jax.tree.map(steps_first, reads), steps_first(window_dt), steps_first(window_kept),
          jax.tree.map(steps_first, leaving))

    def step(h, x):
      dt_t, keep_t, w_t, r_t, window_dt_t, window_kept_t, leaving_t = x
      h = (decay(dt_t, keep_t) * h + write(w_t)
           - decay(window_dt_t, window_kept_t) * write(leaving_t))
      return h, read(h, r_t)
  else:
    xs = (steps_first(dt), steps_first(keep), jax.tree.map(steps_first, writes),
          jax.tree.map(steps_first, reads))

    def step(h, x):
      dt_t, keep_t, w_t, r_t = x
      h = decay(dt_t, keep_t) * h + write(w_t)
      if norm_max:
        h = _clip_norm(h, norm_max)
      return h, read(h, r_t)

  final, y = lax.scan(step, h, xs)
  return jax.tree.map(lambda v: jnp.moveaxis(v, 0, 1), y), final, new_history
