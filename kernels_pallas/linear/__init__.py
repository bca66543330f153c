"""Chunked causal linear attention (Lightning Attention-2 tiling) with scalar or per-step decay,
initial state in and final state out. `kernel.py` (entry point, custom VJP, references), `tpu.py`
/ `gpu.py` (variants), `tiles.py` (the chunk maths both share)."""

from kernels_pallas.linear.kernel import linear_attention
from kernels_pallas.linear.kernel import linear_attention_recurrent
from kernels_pallas.linear.kernel import linear_attention_reference

__all__ = ["linear_attention", "linear_attention_recurrent", "linear_attention_reference"]
