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


# Kernel variants: which Pallas lowering a kernel body is written for. "tpu" is Mosaic TPU (grid
# axes that revisit an output block, scratch memory, scalar prefetch); "gpu" is Triton (no
# sequential grid axes, so reductions are loops inside the body). In interpret mode on CPU both
# run, so tests pick either with an override.
VARIANTS = ("tpu", "gpu")


def kernel_variant(override: str | None = None) -> str:
  """The kernel variant to run: `override` if given, else TPU on TPU and GPU elsewhere.

  On CPU the GPU variant is the default because it has far fewer grid steps (its loops over
  blocks run inside the body), which is what the interpreter pays for.
  """
  if override is not None:
    if override not in VARIANTS:
      raise ValueError(f"kernel variant must be one of {VARIANTS}, got {override!r}")
    return override
  return "tpu" if backend() == "tpu" else "gpu"


def next_power_of_2(n: int) -> int:
  """Smallest power of two >= n (n >= 1)."""
  return 1 << max(n - 1, 0).bit_length()


def default_block_sizes(variant: str, q_length: int, kv_length: int) -> tuple[int, int]:
  """(block_q, block_k) for a flash attention call when the caller gives none.

  TPU: 512 x 512 (multiples of the 128-lane vreg width; the tile of scores is 1 MiB of f32, well
  inside VMEM), shrunk to the padded length for short sequences (block_q to a multiple of 8
  sublanes, block_k to a multiple of 128 lanes). GPU: 64 x 64 (powers of two, as Triton needs;
  the FlashAttention-2 tile for head dims up to 128 on an A100/H100), shrunk to the next power of
  two >= 16 (Triton's smallest dot). Not tuned on hardware: no accelerator was available.
  """
  if variant == "tpu":
    return min(512, cdiv(q_length, 8) * 8), min(512, cdiv(kv_length, 128) * 128)
  return (min(64, max(16, next_power_of_2(q_length))),
          min(64, max(16, next_power_of_2(kv_length))))


TPU_LANES = 128  # vreg lanes
TPU_SUBLANES = 8


def tpu_columns(ids: jax.Array) -> jax.Array:
  """[B, L] per-position ids -> [B, L, 128]: a column layout Mosaic can tile (positions on
  sublanes), read as [block, 1] columns of a query-side tile."""
  return jax.lax.broadcast_in_dim(ids, (*ids.shape, TPU_LANES), (0, 1))


def tpu_rows(ids: jax.Array) -> jax.Array:
  """[B, L] per-position ids -> [B, 8, L]: a row layout (positions on lanes), read as
  [1, block] rows of a key-side tile."""
  return jax.lax.broadcast_in_dim(ids, (ids.shape[0], TPU_SUBLANES, ids.shape[1]), (0, 2))


def compiler_params(variant: str, *, dimension_semantics: tuple[str, ...], head_dim: int):
  """Backend compiler parameters for a kernel: the one place they are chosen.

  Args:
    variant: "tpu" or "gpu".
    dimension_semantics: per grid axis, "parallel" (independent programs: Mosaic may split them
      over the TensorCores of a chip) or "arbitrary" (sequential: a reduction that revisits the
      same output block). Only Mosaic reads it.
    head_dim: H; Triton gets more warps for wider tiles.

  Returns:
    `pltpu.CompilerParams` or `plgpu.CompilerParams` (the interpreter ignores both).
  """
  # Imported here so that importing kernels_pallas stays cheap for code that only pads.
  if variant == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  # 4 warps for head dims up to 64 and 8 above, 2 pipeline stages: the settings of jax's own
  # Triton attention kernel.
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


def check_qkv(q, k, v) -> None:
  """Raises ValueError unless q [B, T, N, H] and k, v [B, S, K, H] fit attention: N % K == 0,
  one dtype, T, S >= 1. Shared by the kernels and `longjax.ops.dot_product_attention`."""
  b, t, n, h = q.shape
  if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
    raise ValueError(f"k and v must be [B={b}, S, K, H={h}], got {k.shape} and {v.shape}")
  if n % k.shape[2]:
    raise ValueError(f"query heads N={n} must be a multiple of kv heads K={k.shape[2]}")
  if q.dtype != k.dtype or q.dtype != v.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if t < 1 or k.shape[1] < 1:
    raise ValueError(f"empty sequences are not supported: T={t}, S={k.shape[1]}")
