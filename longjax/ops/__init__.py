"""Pure operations without parameters, one dispatch point per operation (`dispatch`: each op's
table of implementations, and `dispatch.resolve`, the one place "auto" is decided).

Attention: `dot_product_attention(q, k, v, mask=AttentionMask(...), bias=None, impl="auto")`;
softplus attention with l1 normalisation and re-weighting (LSSA/LSSAR): `softplus_attention`;
a learned sink key/value merged into softmax rows by their log-sum-exp: `add_learned_sink`.
The softmax numerics every path shares live once, in `kernels_pallas.softmax`; layers reach the
ones they need through here: `merge_attention` (the log-sum-exp merge of partial results),
`grouped_logits` and `masked_softmax_attention` (the dense reference).
"""

from kernels_pallas.softmax import grouped_logits
from kernels_pallas.softmax import masked_softmax_attention
from kernels_pallas.softmax import merge_attention

from longjax.ops.attention import default_block_size
from longjax.ops.attention import dot_product_attention
from longjax.ops.attention import resolve_call
from longjax.ops.biases import AlibiBias
from longjax.ops.biases import FireBias
from longjax.ops.biases import KerpleBias
from longjax.ops.biases import T5Bias
from longjax.ops.learned_sink import add_learned_sink
from longjax.ops.masks import AttentionMask
from longjax.ops.softplus_attention import softplus_attention

__all__ = [
    "AlibiBias",
    "AttentionMask",
    "FireBias",
    "KerpleBias",
    "T5Bias",
    "add_learned_sink",
    "default_block_size",
    "dot_product_attention",
    "grouped_logits",
    "masked_softmax_attention",
    "merge_attention",
    "resolve_call",
    "softplus_attention",
]
