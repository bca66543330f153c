"""Mamba-1 selective scan, chunked, with initial state in and final state out. `kernel.py`
(entry point, custom VJP, reference), `tpu.py` / `gpu.py` (variants), `tiles.py` (the chunk maths
both share)."""

from kernels_pallas.scan.kernel import selective_scan
from kernels_pallas.scan.kernel import selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference"]
