"""Parameter helpers: every parameter carries logical axis names.

Logical names ("embed", "mlp", "heads", ...) are mapped to mesh axes by the rules in
`longjax.parallel.mesh`; modules never name mesh axes. We switch Flax's eager sharding off for
these parameters: the train state is created abstractly and then materialised with explicit
`out_shardings` (see `longjax.training.state`), so a module can also be built outside any mesh.
"""

from collections.abc import Callable

from flax import nnx
import jax
import jax.numpy as jnp

# The logical axis names used by longjax parameters.
VOCAB = "vocab"
EMBED = "embed"
MLP = "mlp"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
LAYERS = "layers"
POSITIONS = "positions"


def param(rngs: nnx.Rngs, init: Callable, shape: tuple[int, ...], names: tuple[str | None, ...],
          dtype=jnp.float32) -> nnx.Param:
  """Creates a float parameter with logical axis names."""
  if len(shape) != len(names):
    raise ValueError(f"shape {shape} and axis names {names} differ in rank")
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=tuple(names),
                   eager_sharding=False)


def normal(stddev: float) -> Callable:
  return jax.nn.initializers.normal(stddev)


def fan_in_init(scale: float = 1.0, *, in_axis=0, out_axis=-1) -> Callable:
  """Truncated normal with variance scale / fan_in, fan_in taken over `in_axis` only.

  Multi-axis kernels such as [D, N, H] need the axes spelled out: the default rule would count
  N as the fan-in.
  """
  return jax.nn.initializers.variance_scaling(scale, "fan_in", "truncated_normal",
                                              in_axis=in_axis, out_axis=out_axis)
