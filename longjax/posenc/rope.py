"""Rotary position embedding (RoPE, Su et al. 2021, "RoFormer").

Pure functions. RoPE rotates each pair of query/key features by an angle proportional to the
token's position, so that q_m . k_n depends only on m - n. We use the "half" layout (feature i is
paired with feature i + H/2), as in GPT-NeoX and Llama.

Partial rotary (GPT-J, GPT-NeoX): only the first R = `rotary_dim(H, fraction)` features are
rotated (pairing i with i + R/2 inside them) and the other H - R pass through unchanged; the
number of inverse frequencies, R/2, says how many features `apply_rope` rotates.
"""

import math

import jax.numpy as jnp

from longjax.typing import Array


def rotary_dim(head_dim: int, fraction: float = 1.0) -> int:
  """R = round(fraction * H / 2) * 2 (halves rounded up): the number of rotated features.

  Args:
    head_dim: H.
    fraction: in (0, 1], e.g. 0.25 (GPT-NeoX) or 1.0 (all features).

  Returns:
    An even R in [2, H].
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"rotary fraction must be in (0, 1], got {fraction}")
  dim = int(math.floor(fraction * head_dim / 2 + 0.5)) * 2
  if dim < 2:
    raise ValueError(f"rotary fraction {fraction} of head dim {head_dim} rotates no feature pair")
  return min(dim, head_dim - head_dim % 2)


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


def apply_rope(x: Array, positions: Array, inv_freq: Array, *,
               scale: float | Array = 1.0) -> Array:
  """Rotates the first 2 * len(inv_freq) features of x by its positions.

  Args:
    x: [B, T, N, H] queries or keys.
    positions: [B, T] positions.
    inv_freq: [R/2] inverse frequencies, R <= H (R < H: partial rotary, the rest untouched).
    scale: multiplies all H output features (an attention factor such as YaRN's; 1 = none).

  Returns:
    [B, T, N, H] in x.dtype (the rotation itself is computed in float32).
  """
  rotary = 2 * inv_freq.shape[-1]
  if rotary > x.shape[-1]:
    raise ValueError(f"{rotary // 2} inverse frequencies rotate {rotary} features, more than the "
                     f"head dim {x.shape[-1]}")
  cos, sin = rope_angles(positions, inv_freq)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32[..., :rotary], 2, axis=-1)
  parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
  if rotary < x.shape[-1]:
    parts.append(x32[..., rotary:])  # partial rotary: passes through (exactly, via float32)
  out = jnp.concatenate(parts, axis=-1)
  if not (isinstance(scale, (int, float)) and scale == 1):
    out = out * scale
  return out.astype(x.dtype)
