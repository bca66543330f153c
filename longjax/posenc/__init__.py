"""Positional encodings as pure functions of explicit positions.

Modules in `longjax.layers.positional` wrap these and register them by config name.
"""

from longjax.posenc import clex
from longjax.posenc.absolute import sinusoidal_encoding
from longjax.posenc.alibi import alibi_slopes
from longjax.posenc.position_transforms import POSITION_TRANSFORMS, make_position_transform
from longjax.posenc.relative_bias import (FireParams, fire_bias, kerple_bias, t5_bias,
                                           t5_bucket_table, t5_buckets)
from longjax.posenc.rope import apply_rope, rope_angles, rope_inv_freq, rotary_dim
from longjax.posenc.rope_scaling import ROPE_SCALINGS, scaled_rope_frequencies
from longjax.posenc.xpos import apply_xpos, xpos_decay_rates

__all__ = ["clex", "FireParams", "fire_bias", "kerple_bias", "t5_bias", "t5_bucket_table",
           "t5_buckets",
           "POSITION_TRANSFORMS", "ROPE_SCALINGS", "alibi_slopes", "apply_rope",
           "make_position_transform", "rope_angles", "rope_inv_freq", "rotary_dim",
           "scaled_rope_frequencies", "sinusoidal_encoding", "apply_xpos",
           "xpos_decay_rates"]
