"""Split-KV decode attention (flash-decoding): a few queries against a KV cache whose length is a
run-time value. `kernel.py` (entry point, reference), `tpu.py` / `gpu.py` (variants on the flash
family's tiles)."""

from kernels_pallas.decode.kernel import decode_attention
from kernels_pallas.decode.kernel import decode_attention_reference

__all__ = ["decode_attention", "decode_attention_reference"]
