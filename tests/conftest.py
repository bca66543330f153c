"""pytest glue for absltest suites."""

import gc

from absl import flags
import jax
import pytest


def pytest_configure(config):
  del config
  # absltest reads flags such as --test_tmpdir; under pytest nobody parses them.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
  """Drops the compiled programs of each test module when it ends.

  A pytest worker runs ~600 tests and would otherwise keep every executable it compiled;
  twice a worker crashed (SIGSEGV) late in the suite inside XLA's CPU compiler, in tests that
  pass alone. Programs are rarely shared across modules, so this costs little compilation.
  """
  yield
  jax.clear_caches()
  gc.collect()
