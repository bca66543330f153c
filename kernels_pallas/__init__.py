"""Pallas kernels, one subpackage per family (flash, decode, linear, scan, landmark), and the
helpers they share (common, softmax, block_mask, t5_buckets).

This is a leaf package: it imports jax only, never `longjax`, so kernels can be tested, exported
and benchmarked on their own. The XLA ops in `longjax.ops` reuse the helpers in `common` so that
both sides pad, block and detect the backend in the same way.
"""

from kernels_pallas.common import backend
from kernels_pallas.common import cdiv
from kernels_pallas.common import default_interpret
from kernels_pallas.common import pad_to_multiple
from kernels_pallas.decode import decode_attention
from kernels_pallas.decode import decode_attention_reference
from kernels_pallas.flash import flash_attention
from kernels_pallas.flash import flash_attention_reference
from kernels_pallas.landmark import landmark_attention
from kernels_pallas.landmark import landmark_attention_reference
from kernels_pallas.linear import linear_attention
from kernels_pallas.linear import linear_attention_recurrent
from kernels_pallas.linear import linear_attention_reference
from kernels_pallas.scan import selective_scan
from kernels_pallas.scan import selective_scan_reference

__all__ = ["backend", "cdiv", "decode_attention", "decode_attention_reference",
           "default_interpret", "flash_attention", "flash_attention_reference",
           "landmark_attention", "landmark_attention_reference",
           "linear_attention", "linear_attention_recurrent", "linear_attention_reference",
           "pad_to_multiple", "selective_scan", "selective_scan_reference"]
