"""The PyTorch peers' environment: whether torch is installed, importing it, its threads."""

import os

from longjax.benchmarks.processes import Skip


def torch_env() -> dict:
  """Environment for a PyTorch child: OpenMP threads that sleep instead of spinning at a barrier.

  On a 2-core machine shared with other jobs, libgomp's default (spin, then sleep) collapses
  when a core is taken: torch SDPA fwd+bwd at T=128 took 84 ms instead of 2 ms at load average
  4 on 2 cores, with OMP_WAIT_POLICY=PASSIVE 2 ms. The benchmark compares implementations, not
  the scheduler, so torch gets the setting unless the user has chosen one (recorded in the JSON).
  """
  return {} if "OMP_WAIT_POLICY" in os.environ else {"OMP_WAIT_POLICY": "PASSIVE"}


def torch_missing(needs: tuple[str, ...] = ("torch",)) -> str | None:
  """Why the PyTorch peers cannot run here (the `bench` extra is missing), or None.

  `needs`: the packages the peers import, e.g. ("torch", "transformers") for the HF models.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  for name in needs:
    if importlib.util.find_spec(name) is None:
      return f"{name} is not installed; pip install -e '.[bench]'"
  return None


def import_torch():
  """Imports torch, or raises `Skip` with the reason (it is in the optional `bench` extra)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise Skip(f"torch is not installed ({e}); pip install -e '.[bench]'") from e
  return torch


def import_transformers():
  """(torch, transformers), seeded (torch.manual_seed(0)) for building a model, or raises `Skip`
  with the reason (both are in the optional `bench` extra)."""
  torch = import_torch()
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise Skip(f"transformers is not installed ({e}); pip install -e '.[bench]'") from e
  torch.manual_seed(0)
  return torch, transformers
