"""CLEX (Chen et al. 2024, "CLEX: Continuous Length Extrapolation for Large Language Models"):
RoPE frequencies that follow a learned ODE over the length scale t.

Static scalings fix one map from the scale t = l / L (context length over training length) to
RoPE's inverse frequencies. CLEX learns it: the log inverse frequencies z(t) = log theta(t) obey

    dz/dt = g((z + log theta_ntk(t)) / log theta) + d/dt log theta_ntk(t),  z(1) = log theta_rope,

where theta_ntk(t) are NTK-aware frequencies with base factor alpha = 2t - 1 (their log
derivative is the "time embedding" of the paper) and g(x) = W2 silu(W1 x) is a small MLP with W2
initialised to 0, so an untrained CLEX *is* NTK scaling with alpha = 2t - 1. (Two changes for
stable training from scratch, see `dynamics` and `Z_MIN`: the MLP input is divided by log theta,
and z is kept in [Z_MIN, 0].) Training samples an
integer t in 1..t_max per step and positions spread over [0, t L) (the `clex` position transform),
so g learns how frequencies should move with the scale; at evaluation t = ceil(l / L) may exceed
t_max, and the ODE is simply integrated further (that is CLEX's extrapolation).

We integrate with classical Runge-Kutta in u = log t, a fixed number of steps from u = 0: the
time embedding varies like 1 / (2t - 1), smooth in log t, and a fixed step count keeps the
solve differentiable (a `lax.scan`) for a traced t. The paper shares one ODE across layers;
here each attention layer owns one (a few hundred parameters), because mixers are independent
modules with one interface.
"""

import jax
import jax.numpy as jnp

from longjax.typing import Array

# Runge-Kutta steps in log t: at init the solution is in closed form (NTK), and 32 steps match
# it to ~1e-6 relative at t = 64 (tests/posenc/xpos_clex_test.py).
ODE_STEPS = 32
# The state z = log(inverse frequency) is kept in [Z_MIN, 0] after every step. Above 0 a pair
# would turn more than one radian per token (RoPE's fastest pair turns exactly one), and an
# unbounded z lets the learned term feed itself: trained at the quickstart's learning rate,
# frequencies reached ~1e17 within 30 steps and the gradients overflowed. Below Z_MIN a pair
# turns less than 1e-13 rad per token, i.e. not at all for any context we can run; NTK's own
# frequencies stay inside the range (untrained CLEX is unchanged).
Z_MIN = -30.0


def ntk_log_frequencies(t: Array, rotary_dim: int, theta: float) -> tuple[Array, Array]:
  """log theta_ntk(t) and its t-derivative for alpha = 2t - 1 (t >= 1).

  theta_ntk,i = (theta * alpha^(R / (R - 2)))^(-2i / R) = theta^(-2i/R) * alpha^(-2i / (R - 2)).

  Args:
    t: scalar scale >= 1.
    rotary_dim: R, even, >= 4 (the NTK exponent divides by R - 2).
    theta: the RoPE base.

  Returns:
    ([R/2], [R/2]) float32.
  """
  i = jnp.arange(rotary_dim // 2, dtype=jnp.float32)
  alpha = 2.0 * t - 1.0
  exponent = 2.0 * i / (rotary_dim - 2)
  log_freq = -(2.0 * i / rotary_dim) * jnp.log(theta) - exponent * jnp.log(alpha)
  return log_freq, -exponent * 2.0 / alpha


def init_params(key: Array, rotary_dim: int, hidden_factor: int = 1) -> dict:
  """g's weights: W1 [R/2, F R] (fan-in uniform), W2 [F R, R/2] = 0 (so CLEX starts as NTK)."""
  half, hidden = rotary_dim // 2, hidden_factor * rotary_dim
  bound = half**-0.5
  return {"w1": jax.random.uniform(key, (half, hidden), jnp.float32, -bound, bound),
          "w2": jnp.zeros((hidden, half), jnp.float32)}


def dynamics(params: dict, z: Array, t: Array, rotary_dim: int, theta: float) -> Array:
  """dz/dt at (z [R/2], t): the learned term plus NTK's time embedding.

  The MLP sees (z + log theta_ntk(t)) / log(theta), the paper's input divided by the base's
  log so that it is O(1) (raw log frequencies reach -2 log theta ~ -18 and made the learned
  term, and its feedback on z, large from the first updates).
  """
  log_ntk, dlog_ntk = ntk_log_frequencies(t, rotary_dim, theta)
  x = (z + log_ntk) / jnp.log(theta)
  return jax.nn.silu(x @ params["w1"]) @ params["w2"] + dlog_ntk


def clex_inv_freq(params: dict, t: Array, *, rotary_dim: int, theta: float,
                  steps: int = ODE_STEPS) -> Array:
  """theta(t) = exp(z(t)): the [R/2] float32 inverse frequencies at scale t >= 1 (traced ok).

  Classical RK4 on dz/du = t g(z, t), t = e^u, from u = 0 (z = log RoPE frequencies) to log t.
  """
  t = jnp.maximum(jnp.asarray(t, jnp.float32), 1.0)
  h = jnp.log(t) / steps
  params = jax.tree.map(lambda p: p.astype(jnp.float32), params)

  def f(u, z):
    time = jnp.exp(u)
    return time * dynamics(params, z, time, rotary_dim, theta)

  def step(z, k):
    u = k * h
    k1 = f(u, z)
    k2 = f(u + h / 2, z + h / 2 * k1)
    k3 = f(u + h / 2, z + h / 2 * k2)
    k4 = f(u + h, z + h * k3)
    return jnp.clip(z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), Z_MIN, 0.0), None

  z0, _ = ntk_log_frequencies(jnp.float32(1.0), rotary_dim, theta)
  z, _ = jax.lax.scan(step, z0, jnp.arange(steps, dtype=jnp.float32))
  return jnp.exp(z)


def scale_for_length(length: Array, original_length: int) -> Array:
  """CLEX's integer scale t = max(1, ceil(l / L)) for a context of l tokens (traced ok)."""
  return jnp.maximum(1.0, jnp.ceil(jnp.asarray(length, jnp.float32) / original_length))
