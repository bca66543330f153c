"""The one place every op chooses its implementation.

Each op (softmax attention, softplus attention; the linear-attention and scan ops register here
as they come) declares an `Op`: a table of `Implementation`s, each with a check that names why
it cannot serve a call (None if it can), and per backend the order in which `impl="auto"` tries
them. `resolve` is the only function that decides "auto", and it returns the reason with the
choice, so a benchmark, a log line or a test can say *why* a call ran where it did.

The checks receive the call (an op-specific description: shapes, dtypes, mask and bias specs)
and a `Context`: the backend, and the sharding of the call's sequence (None today). A
sequence-parallel implementation (ring attention, a sharded scan) is then one more table entry
whose check asks for a sharded sequence, and no call site changes.
"""

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any

from kernels_pallas import common


@dataclasses.dataclass(frozen=True)
class Context:
  """What an implementation check may ask besides the call itself.

  Attributes:
    backend: "cpu", "gpu" or "tpu", the platform the call will run on.
    sharding: how the call's sequence is sharded over a mesh (None: not sharded).
  """
  backend: str
  sharding: Any = None


def _serves_everything(call, context: Context) -> str | None:
  del call, context
  return None


@dataclasses.dataclass(frozen=True)
class Implementation:
  """One way to compute an op.

  Attributes:
    name: the value of the op's `impl` argument that forces it.
    unsupported: (call, Context) -> why it cannot serve the call, or None; a forced `impl`
      that cannot serve raises with this reason.
    passed_over: (call, Context) -> why "auto" should not pick it for this call although it
      could serve it (e.g. the dense reference at a length where its logits are quadratic in
      memory), or None; a forced `impl` ignores it.
  """
  name: str
  unsupported: Callable[[Any, Context], str | None] = _serves_everything
  passed_over: Callable[[Any, Context], str | None] = _serves_everything


@dataclasses.dataclass(frozen=True)
class Resolution:
  """The implementation that will run and why (for logs, benchmarks and tests).

  Attributes:
    impl: the implementation's name.
    reason: one line: "requested", or the "auto" order and why the ones before were skipped.
    skipped: (name, why) of each implementation "auto" tried before `impl`.
  """
  impl: str
  reason: str
  skipped: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Op:
  """An op's implementations and the order "auto" tries them in on each backend.

  Attributes:
    name: the op's name, for messages.
    implementations: every implementation a caller may force.
    preference: backend -> implementation names in the order "auto" tries them; a backend
      without an entry uses the "cpu" order. The last name of each order should serve every
      call (the op's fallback); `resolve` raises, listing every reason, when none does.
  """
  name: str
  implementations: tuple[Implementation, ...]
  preference: Mapping[str, tuple[str, ...]]

  def __post_init__(self):
    if "cpu" not in self.preference:
      raise ValueError(f"{self.name}: preference needs a 'cpu' order (the default)")
    names = set(self.names)
    for backend, order in self.preference.items():
      unknown = [name for name in order if name not in names]
      if unknown or not order:
        raise ValueError(f"{self.name}: preference[{backend!r}]={order} names no implementation "
                         f"or unknown ones {unknown}; valid: {self.names}")

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(i.name for i in self.implementations)

  @property
  def choices(self) -> tuple[str, ...]:
    """Every valid `impl` value: "auto" and the implementations."""
    return ("auto", *self.names)

  def implementation(self, name: str) -> Implementation:
    for implementation in self.implementations:
      if implementation.name == name:
        return implementation
    raise ValueError(f"impl={name!r} is not an implementation of {self.name}; valid choices: "
                     f"{self.choices}")


def resolve(op: Op, impl: str, call, *, backend: str | None = None,
            sharding=None) -> Resolution:
  """The implementation of `op` that serves `call`; the only place "auto" is decided.

  Args:
    op: the op's table.
    impl: "auto" or one of `op.names`.
    call: the op's description of this call, passed to the checks.
    backend: "cpu", "gpu" or "tpu" (None: jax's default backend).
    sharding: the sequence sharding of the call (None: unsharded), passed to the checks.

  Returns:
    A `Resolution`: the implementation, and why (the reasons the ones before it were skipped).

  Raises:
    ValueError: for an unknown `impl` (listing the valid choices), or a forced implementation
      that cannot serve the call (saying why).
  """
  context = Context(backend=common.backend() if backend is None else backend, sharding=sharding)
  if impl != "auto":
    reason = op.implementation(impl).unsupported(call, context)
    if reason is not None:
      raise ValueError(f"impl={impl!r} cannot serve this call: {reason}")
    return Resolution(impl, "requested")
  order = op.preference.get(context.backend, op.preference["cpu"])
  skipped = []
  for name in order:
    implementation = op.implementation(name)
    reason = (implementation.unsupported(call, context)
              or implementation.passed_over(call, context))
    if reason is None:
      why = f"auto on {context.backend}: first of {', '.join(order)} that serves"
      if skipped:
        why += " (" + "; ".join(f"not {n}: {r}" for n, r in skipped) + ")"
      return Resolution(name, why, tuple(skipped))
    skipped.append((name, reason))
  raise ValueError(f"no {op.name} implementation serves this call on {context.backend}: "
                   + "; ".join(f"not {n}: {r}" for n, r in skipped))
