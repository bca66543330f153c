"""Absolute position encodings added to the token embeddings.

Sinusoidal (Vaswani et al. 2017): feature 2i is sin(p / 10000^(2i/D)), feature 2i+1 the cosine.
We lay the sines in the first half and the cosines in the second, which is the same encoding up to a
fixed permutation of features.
"""

import jax.numpy as jnp

from longjax.typing import Array


def sinusoidal_encoding(positions: Array, width: int, max_timescale: float = 10_000.0) -> Array:
  """Sinusoidal encoding of integer positions.

  Args:
    positions: [B, T] positions.
    width: D, must be even.
    max_timescale: the longest wavelength / (2 pi).

  Returns:
    [B, T, D] float32.
  """
  if width % 2:
    raise ValueError(f"sinusoidal encoding needs an even width, got {width}")
  half = width // 2
  inv_timescales = max_timescale ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = positions.astype(jnp.float32)[..., None] * inv_timescales
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
