"""Compiles the C++ CPU kernels on first use and registers them with XLA as FFI targets.

The shared library is built with the machine's C++ compiler (`CXX`, default g++) for the CPU it
runs on (-march=native) against the XLA FFI headers that ship with jaxlib, and cached under
`$LONGJAX_CACHE` (default ~/.cache/longjax)/cpu_kernels, keyed by a hash of the source, the
jaxlib version, the compiler's version and flags and the CPU's feature flags, so a changed source,
jaxlib, compiler or machine rebuilds instead of loading a stale or illegal binary. `CXXFLAGS` is
appended to the compiler's flags (e.g. `-mno-avx512f` builds the AVX2 code path on an AVX-512
machine; the tests do that to check it). Each cached library has its SHA-256 beside it, checked
before loading: a damaged one is rebuilt, not loaded. Concurrent first uses (pytest workers)
serialise on a file lock; a read-only cache with a valid library is used as it is. Without a
compiler, `unavailable_reason()` says why and `longjax.ops` falls back to its XLA blockwise
attention (saying so once).
"""

import ctypes
import fcntl
import functools
import hashlib
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile

import jax

_SOURCES = ("flash_attention.cc", "selective_scan.cc")  # compiled; they include the headers
_HEADERS = ("simd.h", "gemm.h", "mask.h", "thread_pool.h", "blocks.h", "decode.h", "forward.h",
            "backward.h", "selective_scan.h")
# FFI handler symbols in the library, registered under the same names.
TARGETS = ("LongjaxFlashForward", "LongjaxFlashBackward", "LongjaxSelectiveScanForward",
           "LongjaxSelectiveScanBackward")


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("LONGJAX_CACHE") or os.path.join(pathlib.Path.home(), ".cache", "longjax")
  return pathlib.Path(root) / "cpu_kernels"


def _cpu_flags() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("flags"):
        return line
  except OSError:
    pass
  import platform  # pylint: disable=g-import-not-at-top
  return platform.processor() or platform.machine()


def _compiler() -> str | None:
  return shutil.which(os.environ.get("CXX", "g++"))


def _extra_flags() -> list[str]:
  return shlex.split(os.environ.get("CXXFLAGS", ""))


def _build_key(compiler: str) -> str:
  digest = hashlib.sha256()
  here = pathlib.Path(__file__).parent
  for name in (*_SOURCES, *_HEADERS):  # a changed header rebuilds too
    digest.update((here / name).read_bytes())
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  import jaxlib  # pylint: disable=g-import-not-at-top
  for part in (jaxlib.__version__, version, " ".join(_extra_flags()), _cpu_flags()):
    digest.update(part.encode())
  return digest.hexdigest()[:16]


def _compile(compiler: str, target: pathlib.Path) -> None:
  here = pathlib.Path(__file__).parent
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    out = pathlib.Path(tmp) / target.name
    cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
           *_extra_flags(), f"-I{jax.ffi.include_dir()}", *(str(here / s) for s in _SOURCES),
           "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    os.replace(out, target)


def _digest(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(target: pathlib.Path) -> bool:
  """Whether `target` exists and matches the checksum written beside it after its build.

  A library truncated by a full disk or a killed copy would otherwise be loaded and crash the
  process (a bus error) on every run; one without a checksum predates them and is rebuilt.
  """
  stamp = target.with_name(target.name + ".sha256")
  try:
    return stamp.read_text().strip() == _digest(target)
  except OSError:
    return False


def cached_library(cache: pathlib.Path, name: str, build) -> pathlib.Path:
  """The verified library `cache/name`, built with `build(path)` when missing or damaged.

  A valid library is used without taking the lock, so a read-only cache that holds one works.
  Building serialises concurrent processes on `cache/.lock`; the library is moved into place
  and then its checksum written, both atomically, so a reader never accepts a partial file.

  Raises:
    OSError: the cache cannot be written where a build is needed; RuntimeError from `build`.
  """
  target = cache / name
  if _verified(target):
    return target
  cache.mkdir(parents=True, exist_ok=True)
  with open(cache / ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not _verified(target):  # another process may have built it while this one waited
      build(target)
      stamp = target.with_name(target.name + ".sha256")
      tmp = stamp.with_name(stamp.name + ".tmp")
      tmp.write_text(_digest(target) + "\n")
      os.replace(tmp, stamp)
  return target


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
  """(library, None) once built and registered, else (None, why not)."""
  compiler = _compiler()
  if compiler is None:
    return None, f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH to build them"
  try:
    target = cached_library(_cache_dir(), f"longjax_cpu_{_build_key(compiler)}.so",
                            functools.partial(_compile, compiler))
    library = ctypes.cdll.LoadLibrary(str(target))
  except (OSError, RuntimeError) as error:
    return None, f"building them failed: {str(error).splitlines()[0]}"
  for name in TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
  return library, None


def unavailable_reason() -> str | None:
  """None when the CPU kernels are built and registered, else why they are not (one line)."""
  return _load()[1]


def ensure_loaded() -> None:
  """Builds and registers the kernels; raises RuntimeError saying why when that is impossible."""
  reason = unavailable_reason()
  if reason is not None:
    raise RuntimeError(f"the fused CPU kernels are unavailable: {reason}")
