"""Models built from registries of mixers and positional encodings."""

from longjax.models.build import build_model
from longjax.models.lm import DecoderLM, REMAT_POLICIES
from longjax.models.registry import MIXERS, parse_mixers

__all__ = ["DecoderLM", "MIXERS", "REMAT_POLICIES", "build_model", "parse_mixers"]
