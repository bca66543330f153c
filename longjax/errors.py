"""`ConfigError`, the one error type for a bad config value.

Its own module, importing nothing from longjax, so that the modules a config describes (layers,
mixers) can raise it without importing `longjax.configuration`, which imports them.
"""


class ConfigError(ValueError):
  """A bad config value. str(error) is one line: 'field=value: problem (valid: ...)'."""

  def __init__(self, field: str, value, problem: str, valid=None):
    message = f"{field}={value!r}: {problem}"
    if valid is not None:
      message += " (valid: " + ", ".join(str(v) for v in valid) + ")"
    super().__init__(message)
    self.field = field
