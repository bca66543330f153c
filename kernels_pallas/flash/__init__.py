"""Flash attention (FlashAttention-2) with in-kernel masks and position biases: `kernel.py`
(entry point, custom VJP, reference), `tpu.py` / `gpu.py` (Mosaic / Triton variants), `tiles.py`
(the tile maths both share; decode and landmark attention reuse it)."""

from kernels_pallas.flash.kernel import flash_attention
from kernels_pallas.flash.kernel import flash_attention_reference

__all__ = ["flash_attention", "flash_attention_reference"]
