"""Compiles the C++ CPU kernels on first use and registers them with XLA as FFI targets.

The shared library is built with the machine's C++ compiler (`CXX`, default g++) for the CPU it
runs on (-march=native) against the XLA FFI headers that ship with jaxlib, and cached under
`$LONGJAX_CACHE` (default ~/.cache/longjax)/cpu_kernels, keyed by a hash of the source, the
jaxlib version, the compiler's version and flags and the CPU's feature flags, so a changed source,
jaxlib, compiler or machine rebuilds instead of loading a stale or illegal binary. `CXXFLAGS` is
appended to the compiler's flags (e.g. `-mno-avx512f` builds the AVX2 code path on an AVX-512
machine; the tests do that to check it). Concurrent first uses
(pytest workers) serialise on a file lock. Without a compiler, `unavailable_reason()` says why
and `longjax.ops` falls back to its XLA blockwise attention.
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

_SOURCES = ("flash_attention.cc",)
# FFI handler symbols in the library, registered under the same names.
TARGETS = ("LongjaxFlashForward", "LongjaxFlashBackward")


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
  for name in _SOURCES:
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


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
  """(library, None) once built and registered, else (None, why not)."""
  compiler = _compiler()
  if compiler is None:
    return None, f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH to build them"
  cache = _cache_dir()
  try:
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"longjax_cpu_{_build_key(compiler)}.so"
    with open(cache / ".lock", "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not target.exists():
        _compile(compiler, target)
    library = ctypes.cdll.LoadLibrary(str(target))
  except (OSError, RuntimeError) as error:
    return None, f"building them failed: {error}"
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
