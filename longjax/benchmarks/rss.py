"""Resident memory of benchmark processes (Linux /proc), and the per-case memory budget."""




def _proc_status_mib(pid: int | str, field: str) -> float | None:
  """A "<field>: <n> kB" line of /proc/<pid>/status in MiB; None where /proc is unavailable."""
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024
  except (OSError, ValueError):
    pass
  return None


def peak_rss_mib(pid: int | str = "self") -> float | None:
  """A process's peak resident set size since its exec, in MiB: VmHWM from /proc.

  Not `getrusage`: Linux carries ru_maxrss across fork and exec, so a child's would start at
  the parent's size (the benchmark's parent holds jax and the library, ~0.3 GiB); VmHWM belongs
  to the address space, which exec replaces. None where /proc is unavailable.
  """
  return _proc_status_mib(pid, "VmHWM")


def current_rss_mib() -> float | None:
  """This process's resident set size now (VmRSS), in MiB; None where /proc is unavailable."""
  return _proc_status_mib("self", "VmRSS")


def reset_peak_rss() -> bool:
  """Resets this process's VmHWM to its current RSS (Linux's clear_refs "5"); False if not.

  So that the peak of one phase (running a step) is not the peak of an earlier one (compiling).
  """
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def available_memory_bytes() -> int | None:
  """MemAvailable from /proc/meminfo (None elsewhere)."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def memory_budget_bytes(memory_budget_gb: float | None) -> int:
  """The per-case compiled-footprint budget: the flag, else 75% of the memory available now."""
  if memory_budget_gb:
    return int(memory_budget_gb * 2**30)
  return int(0.75 * (available_memory_bytes() or 2**40))
