"""Helpers shared by the Pallas kernels and the XLA blockwise ops: padding and backend detection.

Kernels and blockwise ops tile sequences into fixed-size blocks; lengths that are not a multiple of
the block are padded at the end here, and the caller masks the padded keys and drops the padded
query rows.
"""

import jax
import jax.numpy as jnp

# jax reports CUDA and ROCm devices under several platform names; kernels only care about the
# family, which decides the Pallas lowering (Triton / Mosaic GPU vs Mosaic TPU vs interpreter).
_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def cdiv(a: int, b: int) -> int:
  """Ceiling division for non-negative Python ints (or int arrays)."""
  return (a + b - 1) // b


def pad_to_multiple(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
  """Pads `x` at the end of `axis` so that its length is a multiple of `multiple`.

  Args:
    x: array of any shape.
    axis: axis to pad (negative values count from the end).
    multiple: the block size the padded length must be divisible by (>= 1).
    value: fill value of the padding.

  Returns:
    `x` itself when no padding is needed, else an array whose `axis` has length
    `cdiv(x.shape[axis], multiple) * multiple`; the original entries come first.
  """
  if multiple < 1:
    raise ValueError(f"multiple must be >= 1, got {multiple}")
  axis = axis % x.ndim
  extra = cdiv(x.shape[axis], multiple) * multiple - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def backend() -> str:
  """The default backend's family: "cpu", "gpu" or "tpu" (other platforms pass through)."""
  platform = jax.default_backend()
  return "gpu" if platform in _GPU_PLATFORMS else platform


def default_interpret() -> bool:
  """Whether Pallas kernels should run in interpret mode by default: only on CPU.

  CPU has no Pallas lowering, so the interpreter is the only way to run a kernel there (tests).
  """
  return backend() == "cpu"
