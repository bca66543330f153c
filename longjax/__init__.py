"""longjax: long-context sequence modelling and length extrapolation in JAX / Flax NNX.

The curated public API; everything else is importable from its module.
"""

from longjax.configuration import ConfigError, validate
from longjax.models import DecoderLM, build_model
from longjax.models.generate import generate
from longjax.ops import AttentionMask, dot_product_attention
from longjax.runs import load_run

__all__ = ["AttentionMask", "ConfigError", "DecoderLM", "build_model", "dot_product_attention",
           "generate", "load_run", "validate"]

__version__ = "0.1.0"
