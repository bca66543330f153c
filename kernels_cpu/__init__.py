"""Fused CPU kernels (C++ through XLA FFI), built on first use; see `build.py`.

A leaf package like `kernels_pallas`: it imports only jax and numpy. Where Pallas has no compiled
CPU backend, these close the gap between XLA's CPU code and PyTorch's fused CPU kernels.
"""

from kernels_cpu.build import unavailable_reason
from kernels_cpu.flash_attention import flash_attention
from kernels_cpu.flash_attention import unsupported as flash_attention_unsupported
from kernels_cpu.selective_scan import selective_scan
from kernels_cpu.selective_scan import unsupported as selective_scan_unsupported

__all__ = ["flash_attention", "flash_attention_unsupported", "selective_scan",
           "selective_scan_unsupported", "unavailable_reason"]
