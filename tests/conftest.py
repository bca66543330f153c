"""pytest glue for absltest suites."""

import gc
import os
import shutil
import tempfile

from absl import flags
import jax
import pytest

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"

# The suite compiles thousands of small programs, and LLVM's optimisation of the machine code is
# most of a typical test's time; tests check values, not speed. Level 0 skips LLVM's
# optimisation passes only: XLA's HLO passes (fusion, layout, buffer assignment: what a memory
# test reads) run as in a user's process, and results differ at most in rounding (whether a
# multiply and an add are fused), inside every test's tolerance. It takes ~40% off the suite.
# Set before jax creates its CPU client; the xdist workers and every process a test starts
# inherit it.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()


def pytest_configure(config):
  # absltest reads flags such as --test_tmpdir; under pytest nobody parses them.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  # One persistent compilation cache for the whole run: the controller makes it and puts it in
  # the environment, so the xdist workers and every process a test starts (the entry points,
  # benchmark children, the notebook) share it. Many tests compile the same programs (the tiny
  # quickstart model's train step in a dozen command-line runs, the same kernels in several
  # modules); each is compiled once per run. The cache holds XLA's executables keyed by the
  # program, flags and backend, so a hit runs the same machine code; nothing outlives the run.
  if _CACHE_ENV not in os.environ:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="longjax-test-xla-cache-")
    config._longjax_cache_owner = True  # pylint: disable=protected-access
    # Seconds of compilation that make a program worth caching (jax's default is 1 s).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
  # jax read its environment when conftest imported it, before the lines above.
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_ENV])
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 1.0)))


def pytest_unconfigure(config):
  if getattr(config, "_longjax_cache_owner", False):
    shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
  """Drops the compiled programs of each test module from memory when it ends.

  A pytest worker runs ~600 tests and would otherwise keep every executable it compiled;
  twice a worker crashed (SIGSEGV) late in the suite inside XLA's CPU compiler, in tests that
  pass alone. A program another module needs again comes back from the persistent cache.
  """
  yield
  jax.clear_caches()
  gc.collect()
