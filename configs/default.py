"""Every config field with its default (`longjax.defaults`); the base of the other configs."""

from longjax.defaults import default_config


def get_config(arg: str | None = None):
  if arg:
    raise ValueError(f"configs/default.py takes no argument, got {arg!r}")
  return default_config()
