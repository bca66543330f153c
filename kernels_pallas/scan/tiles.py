"""Per-time-step maths of the selective scan, shared by the TPU and GPU kernel variants.

Layout of one program's tile: the state is h [P, Dc] (P state size on sublanes, a block of Dc
channels on lanes), so that the per-channel quantities of one step (dt, u, dy) are lane rows
[1, Dc] and the per-state ones (B_t, C_t) are sublane columns [P, 1]; each step is then pure
broadcasting and sublane reductions. Reductions over channels (dB, dC) are left to the variant:
Mosaic does them as a [1, Dc] x [P, Dc]^T matmul, Triton as a lane sum.

Everything here is f32.
"""

import dataclasses

import jax.numpy as jnp
from jax import lax


def softplus(x):
  """log(1 + e^x) without overflow (the `max + log1p` form, written out for both lowerings)."""
  return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def sigmoid(x):
  """d softplus / dx. For very negative x, exp(-x) = inf gives 1 / inf = 0, not NaN."""
  return 1.0 / (1.0 + jnp.exp(-x))


def discretize(delta, bias, *, use_softplus: bool):
  """Step sizes dt = softplus(delta + bias) (or delta + bias): [rows, Dc] f32."""
  x = delta.astype(jnp.float32) + bias
  return softplus(x) if use_softplus else x


def delta_grad(ddt, delta, bias, *, use_softplus: bool):
  """d(loss)/d(delta) from d(loss)/d(dt): the chain rule through `discretize`."""
  if not use_softplus:
    return ddt
  return ddt * sigmoid(delta.astype(jnp.float32) + bias)


def forward_step(h, a_mat, dt, w, b_col, c_col):
  """One step h_t = exp(dt A) h_{t-1} + B_t (dt u), y_t = <C_t, h_t> (without the D skip).

  Args:
    h: [P, Dc] state h_{t-1}.
    a_mat: [P, Dc] A (transposed: state on sublanes).
    dt: [1, Dc] step sizes.
    w: [1, Dc] dt * u.
    b_col: [P, 1] B_t.
    c_col: [P, 1] C_t.

  Returns:
    (h_t [P, Dc], y_t [1, Dc]).
  """
  h = jnp.exp(dt * a_mat) * h + b_col * w
  return h, jnp.sum(c_col * h, axis=0, keepdims=True)


def backward_step(g_next, h_prev, a_mat, dt, w, b_col, c_col, dy):
  """One reverse step of the adjoint recurrence.

  With g_t = d(loss)/d(h_t) (through y_t and all later steps): g_t = g_next + C_t dy_t, where
  g_next = exp(dt_{t+1} A) g_{t+1} (or the final state's cotangent); then
    d(dt_t) = sum_P g_t * A * exp(dt_t A) * h_{t-1} + u_t * sum_P g_t * B_t,
    dA += g_t * dt_t * exp(dt_t A) * h_{t-1},   du_t = dt_t * sum_P g_t * B_t (+ D dy_t),
    dB_t = sum_D g_t * dt_t u_t,   dC_t = sum_D dy_t * h_t  (over the channels: by the caller).

  Args:
    g_next: [P, Dc] cotangent flowing into h_t from later steps.
    h_prev: [P, Dc] h_{t-1} (recomputed from the chunk's saved start state).
    a_mat, dt, w, b_col, c_col: as for `forward_step`.
    dy: [1, Dc] cotangent of y_t.

  Returns:
    (g_prev [P, Dc] = exp(dt A) g_t, the cotangent flowing into h_{t-1};
     h_t [P, Dc]; g_t [P, Dc]; dA_t [P, Dc] this step's d(A);
     gb [1, Dc] sum_P g_t B_t; ga [1, Dc] sum_P of the d(dt) term through exp(dt A)).
  """
  decay = jnp.exp(dt * a_mat)
  h = decay * h_prev + b_col * w
  g = g_next + c_col * dy
  g_decay = g * decay * h_prev  # d(loss)/d(dt A), elementwise
  gb = jnp.sum(g * b_col, axis=0, keepdims=True)
  ga = jnp.sum(g_decay * a_mat, axis=0, keepdims=True)
  return decay * g, h, g, g_decay * dt, gb, ga


@dataclasses.dataclass(frozen=True)
class ScanSpec:
  """Static description of a padded selective-scan call (hashable: a custom_vjp static arg).

  Attributes:
    length: L, the true sequence length; steps at t >= L are padding and get dt = 0.
    chunk: time steps per chunk; states are saved at chunk starts for the backward pass.
    block_d: Dc, channels per program.
    groups: G, the number of B/C groups; channel block i reads group i // blocks_per_group.
    blocks_per_group: channel blocks per group.
    use_softplus: dt = softplus(delta + bias) rather than delta + bias.
    unroll: unroll factor of the per-step loops (1 in the interpreter, where it only costs
      compile time).
  """
  length: int
  chunk: int
  block_d: int
  groups: int
  blocks_per_group: int
  use_softplus: bool
  unroll: int = 1

  def group(self, d_block):
    """The B/C group of a (traced) channel-block index."""
    return 0 if self.groups == 1 else lax.div(d_block, self.blocks_per_group)
