"""Host memory: keep freed memory in the process for reuse (glibc malloc).

XLA's CPU runtime allocates each execution's temporary buffers afresh and frees them at the end.
glibc serves large requests with fresh `mmap` pages and returns freed memory to the kernel, so
every step of a jitted train step touches hundreds of MiB of new pages: ~148 000 page faults per
step of a d256 L4 T512 B8 decoder on the 2-core CPU, about a quarter of its time
(docs/benchmarks.md). `reuse_freed_memory` makes malloc keep what it frees: one arena, no mmap,
no trimming. After the first steps every allocation is served from memory the process already
has, the step runs without page faults, and the process's resident size stays at its high-water
mark (what a training process holds anyway).

Call it first thing in a process, before JAX starts its thread pool: the arena limit applies only
to threads that have not allocated yet. The entry points (`experiments.train`, `.evaluate`,
`.sample`) and the benchmark cases' child processes (the HF peer's included; not the memory
suite's, whose peak RSS it would raise) do.
"""

import ctypes
import ctypes.util
import platform

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"


def supported() -> bool:
  """Whether this process's C library is glibc, whose malloc the setting is for."""
  return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def reuse_freed_memory() -> bool:
  """Configures glibc malloc to keep and reuse freed memory; returns whether it applied.

  False where the C library is not glibc (macOS, musl): those keep their defaults.
  """
  if not supported():
    return False
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)
