"""Rotary position embedding (RoPE, Su et al. 2021, "RoFormer").

Pure functions. RoPE rotates each pair of query/key features by an angle proportional to the
token's position, so that q_m . k_n depends only on m - n. We use the "half" layout (feature i is
paired with feature i + H/2), as in GPT-NeoX and Llama.
"""

import jax.numpy as jnp

from longjax.typing import Array


def rope_inv_freq(head_dim: int, theta: float = 10_000.0) -> Array:
  """Inverse frequencies theta^(-2i/H) for i in [0, H/2).

  Args:
    head_dim: H, must be even.
    theta: the base ("rope_theta").

  Returns:
    [H/2] float32.
  """
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (theta**exponents)


def rope_angles(positions: Array, inv_freq: Array) -> tuple[Array, Array]:
  """cos and sin tables for integer (or fractional) positions.

  Args:
    positions: [B, T] positions.
    inv_freq: [H/2] inverse frequencies.

  Returns:
    (cos, sin), each [B, T, H/2] float32.
  """
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotates x by its positions.

  Args:
    x: [B, T, N, H] queries or keys.
    positions: [B, T] positions.
    inv_freq: [H/2] inverse frequencies.

  Returns:
    [B, T, N, H] in x.dtype (the rotation itself is computed in float32).
  """
  cos, sin = rope_angles(positions, inv_freq)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
