"""xPos (Sun et al. 2023, "A Length-Extrapolatable Transformer"): RoPE with a per-frequency
exponential decay in the relative distance.

Pair i of the R rotated features gets a decay rate zeta_i = (2i/R + gamma) / (1 + gamma) in
(0, 1): rates near gamma / (1 + gamma) for the fastest-turning pairs (strong decay) and near 1
for the slowest. Queries at position n are rotated by RoPE and scaled by zeta_i^(n / B), keys at
m by zeta_i^(-m / B), so the logit's pair-i term is the RoPE term times zeta_i^((n - m) / B):
it depends only on n - m and shrinks with distance, which the paper found to stabilise attention
beyond the training length (B = `scale_base`, 512 in the paper).

The two scales are applied separately, so each alone grows or shrinks exponentially with the
absolute position: in float32, exp(+-88) bounds them, i.e. positions below
`max_position(...)` (about 36k tokens at the paper's gamma = 0.4, B = 512). The paper's code
centres positions on the middle of the sequence to double that; we keep position 0 as the centre
so that a decode cache of keys scaled at earlier steps stays valid at any length, and validation
rejects evaluation lengths beyond the limit (raise `scale_base` to go further).
"""

import math

import jax.numpy as jnp

from longjax.posenc.rope import apply_rope
from longjax.typing import Array

# exp(80) ~ 5.5e34 leaves float32 (max ~3.4e38) room for the q . k products themselves.
_MAX_LOG_SCALE = 80.0


def xpos_decay_rates(rotary_dim: int, gamma: float = 0.4) -> Array:
  """zeta_i = (2i / R + gamma) / (1 + gamma) for the R/2 rotated pairs: [R/2] float32."""
  if rotary_dim % 2:
    raise ValueError(f"xPos needs an even rotary dim, got {rotary_dim}")
  if gamma <= 0:
    raise ValueError(f"xPos gamma must be positive, got {gamma}")
  pairs = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
  return (pairs + gamma) / (1.0 + gamma)


def max_position(gamma: float = 0.4, scale_base: float = 512.0) -> int:
  """The largest position whose scales zeta^(+-p / B) stay inside float32 (see module doc)."""
  slowest_log = -math.log(gamma / (1.0 + gamma))  # -log of the smallest rate, i = 0
  return int(_MAX_LOG_SCALE * scale_base / slowest_log)


def apply_xpos(x: Array, positions: Array, inv_freq: Array, *, is_key: bool,
               gamma: float = 0.4, scale_base: float = 512.0) -> Array:
  """RoPE rotation followed by xPos's decay scale on the rotated features.

  Args:
    x: [B, T, N, H] queries or keys.
    positions: [B, T] positions.
    inv_freq: [R/2] RoPE inverse frequencies (R <= H; the other H - R features pass through).
    is_key: keys get zeta^(-p / B), queries zeta^(p / B).
    gamma, scale_base: the paper's gamma (0.4) and B (512).

  Returns:
    [B, T, N, H] in x.dtype.
  """
  rotated = apply_rope(x.astype(jnp.float32), positions, inv_freq)  # one rounding, at the end
  rates = xpos_decay_rates(2 * inv_freq.shape[-1], gamma)
  exponent = positions.astype(jnp.float32)[..., None] / scale_base  # [B, T, 1]
  if is_key:
    exponent = -exponent
  scale = rates**exponent  # [B, T, R/2]
  scale = jnp.concatenate([scale, scale], axis=-1)[:, :, None, :]  # pair i is (i, i + R/2)
  rotary = scale.shape[-1]
  out = jnp.concatenate([rotated[..., :rotary] * scale, rotated[..., rotary:]], axis=-1)
  return out.astype(x.dtype)
