"""The studies of `experiments.reproduce`: one module per study, each with `get_study()`.

`load(name)` imports `configs/studies/<name>.py`; `names()` lists them. The module's name is
the study's name.
"""

import importlib
import pkgutil


def names() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load(name: str):
  """The study `name` (a `longjax.studies.Study`); ValueError naming the choices if unknown."""
  if name not in names():
    raise ValueError(f"unknown study {name!r}; valid: {', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}").get_study()
