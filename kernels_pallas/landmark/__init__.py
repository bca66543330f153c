"""Landmark attention's grouped softmax (Mohtashami & Jaggi 2023). `kernel.py` (entry point,
custom VJP, reference), `tpu.py` / `gpu.py` (variants), `tiles.py` (its tile maths, on the flash
family's)."""

from kernels_pallas.landmark.kernel import landmark_attention
from kernels_pallas.landmark.kernel import landmark_attention_reference

__all__ = ["landmark_attention", "landmark_attention_reference"]
