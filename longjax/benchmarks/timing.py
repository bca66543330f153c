"""Timing and compiled memory inside a benchmark case: median of several calls after compilation
and warm-up, with a time budget; JAX cases are compiled ahead of time and refused (`OutOfBudget`)
when their compiled footprint exceeds the memory budget.
"""

import statistics
import time

class OutOfBudget(Exception):
  """A case needs more memory than the budget; raised before running it."""


def _block(x):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.block_until_ready(x)


def _repeats_within(budget_s: float, one_call_s: float, repeats: int) -> int:
  """How many timed runs fit in `budget_s` (at most `repeats`; 0 when one call exceeds it).

  Long cases (the interpreter or a quadratic op at large T) would otherwise take many minutes
  per size; their median is then over fewer runs, and the JSON says how many.
  """
  if one_call_s <= 0:
    return repeats
  return max(0, min(repeats, int(budget_s // one_call_s)))


def _median_of(fn, first_s: float, repeats: int, budget_s: float, sync) -> dict:
  """Median of timed runs; when even one run exceeds the budget, the first (warm-up) call is
  the only sample (compilation is already done: its extra cost is allocations, small next to a
  call that long), flagged by "first_call_only"."""
  n = _repeats_within(budget_s, first_s, repeats)
  times = []
  for _ in range(n):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  if not times:
    return {"time_s": first_s, "times_s": [first_s], "repeats": 1, "first_call_only": True}
  return {"time_s": statistics.median(times), "times_s": times, "repeats": n}


def compiled_memory(compiled) -> dict:
  """The compiled footprint of a `jax.stages.Compiled`, in bytes (None where unavailable)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")
  return {name.replace("_size_in_bytes", "_bytes").replace("_in_bytes", "_bytes"):
          getattr(stats, name, None) for name in fields}


def footprint_bytes(memory: dict) -> int:
  """What a compiled program holds at once: temporaries, arguments and outputs, less the
  outputs that reuse a donated argument's buffer."""
  return (sum(memory.get(k) or 0 for k in ("temp_bytes", "argument_bytes", "output_bytes"))
          - (memory.get("alias_bytes") or 0))


def time_jax(fn, args, *, repeats: int, budget_s: float, memory_budget_bytes: int | None,
             carry: bool = False, warmup: int = 1) -> dict:
  """Compiles `fn(*args)` ahead of time, checks its footprint, then times it.

  Args:
    fn: a function of JAX arrays (it is jitted here).
    args: its arguments.
    repeats: timed runs at most (fewer when they would exceed `budget_s`).
    budget_s: seconds the timed runs may take together.
    memory_budget_bytes: refuse (raise `OutOfBudget`) when the compiled temp + argument +
      output memory exceeds it; None: no check.
    carry: `fn` returns (new first argument, anything), as a train step does: the first
      argument is donated and each call is fed the previous call's result, so the timed loop
      updates one state in place the way a training loop does (without it, every call would
      allocate, and page in, a fresh copy of the parameters and optimizer moments).
    warmup: untimed calls before the timed ones (at least 1).

  Returns:
    time_s (median), times_s, repeats, compile_s, first_call_s and the compiled memory fields.
  """
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  compiled = jax.jit(fn, donate_argnums=0 if carry else ()).lower(*args).compile()
  compile_s = time.perf_counter() - start
  memory = compiled_memory(compiled)
  need = footprint_bytes(memory)
  if memory_budget_bytes is not None and need > memory_budget_bytes:
    raise OutOfBudget(f"compiled footprint {need / 2**30:.1f} GiB > budget "
                      f"{memory_budget_bytes / 2**30:.1f} GiB", memory)
  if carry:
    first, rest = jax.tree.map(lambda x: x.copy(), args[0]), args[1:]  # the caller keeps args[0]

    def call():
      nonlocal first
      first, out = compiled(first, *rest)
      return first, out
  else:
    call = lambda: compiled(*args)  # pylint: disable=unnecessary-lambda-assignment
  first_s = _warm_up(call, warmup, _block)  # first-call allocations, thread pool start
  result = _median_of(call, first_s, repeats, budget_s, _block)
  return {**result, "compile_s": compile_s, "first_call_s": first_s, **memory}


def _warm_up(fn, calls: int, sync) -> float:
  """Calls fn `calls` times (at least once) untimed; returns the first call's seconds."""
  start = time.perf_counter()
  sync(fn())
  first_s = time.perf_counter() - start
  for _ in range(calls - 1):
    sync(fn())
  return first_s


def time_callable(fn, *, repeats: int, budget_s: float, sync=lambda x: x,
                  warmup: int = 1) -> dict:
  """Times an eager callable (a PyTorch step): `warmup` untimed calls, then the median of runs."""
  first_s = _warm_up(fn, warmup, sync)
  return {**_median_of(fn, first_s, repeats, budget_s, sync), "first_call_s": first_s}


def time_with_setup(fn, setup, *, repeats: int, budget_s: float, sync=lambda x: x) -> dict:
  """Times `fn(*setup())`, with `setup` untimed before every call (one warm-up call first).

  For calls that consume their arguments: a jitted decode loop with a donated cache, or a
  PyTorch decode loop that grows the cache it is given.
  """
  args = setup()
  start = time.perf_counter()
  sync(fn(*args))
  first_s = time.perf_counter() - start
  times = []
  for _ in range(_repeats_within(budget_s, first_s, repeats)):
    args = setup()
    start = time.perf_counter()
    sync(fn(*args))
    times.append(time.perf_counter() - start)
  if not times:
    return {"time_s": first_s, "times_s": [first_s], "repeats": 1, "first_call_only": True,
            "first_call_s": first_s}
  return {"time_s": statistics.median(times), "times_s": times, "repeats": len(times),
          "first_call_s": first_s}


