"""pytest glue for absltest suites."""

from absl import flags


def pytest_configure(config):
  del config
  # absltest reads flags such as --test_tmpdir; under pytest nobody parses them.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
