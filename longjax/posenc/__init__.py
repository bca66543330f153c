"""Positional encodings as pure functions of explicit positions.

Modules in `longjax.layers.positional` wrap these and register them by config name.
"""

from longjax.posenc.absolute import sinusoidal_encoding
from longjax.posenc.alibi import alibi_slopes
from longjax.posenc.rope import apply_rope, rope_angles, rope_inv_freq

__all__ = ["alibi_slopes", "apply_rope", "rope_angles", "rope_inv_freq", "sinusoidal_encoding"]
