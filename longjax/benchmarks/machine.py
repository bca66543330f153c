"""Where and how the numbers were taken: the machine and software recorded with every report."""

import importlib.metadata
import os
import platform
import time

from longjax.benchmarks.peers import torch_env


def machine_info(argv: list[str]) -> dict:
  """Where and how the numbers were taken."""
  import jax  # pylint: disable=g-import-not-at-top
  info = {"command": " ".join(["python -m experiments.benchmark"] + argv[1:]),
          "cpu_count": os.cpu_count(), "platform": platform.platform(),
          "processor": cpu_model(), "python": platform.python_version(),
          "jax": jax.__version__, "jax_backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "load_average_at_start": os.getloadavg(),
          "time": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
  try:  # the version without importing torch into the parent (seconds, and its memory)
    info["torch"] = importlib.metadata.version("torch")
    info["torch_child_env"] = torch_env()
  except importlib.metadata.PackageNotFoundError:
    info["torch"] = None
  try:
    with open("/proc/meminfo") as f:
      info["mem_total_gib"] = int(f.readline().split()[1]) / 2**20
  except OSError:
    pass
  return info


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()
