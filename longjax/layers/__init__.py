"""Flax NNX modules: thin wrappers over `longjax.ops` and `longjax.posenc`."""

from longjax.layers.attention import Attention
from longjax.layers.blocks import Block
from longjax.layers.mlp import SwiGLU
from longjax.layers.norms import RMSNorm
from longjax.layers.positional import POSENCS

__all__ = ["Attention", "Block", "POSENCS", "RMSNorm", "SwiGLU"]
