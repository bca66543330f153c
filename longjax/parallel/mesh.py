"""Device meshes and the logical-axis rules that map parameter/activation names onto them.

Mesh axes: `data` (batch), `fsdp` (batch, and parameters sharded over their `embed` axis) and
`tensor` (heads, MLP width, vocabulary). Rules are a config string such as
"batch:data+fsdp,embed:fsdp,mlp:tensor", so a run can change its sharding from the command line.
A logical axis whose size the mesh axes do not divide is replicated instead (for example 4 kv
heads on an 8-way `tensor` axis), which keeps every rule valid for every model size.
"""

from collections.abc import Sequence
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES = ("batch:data+fsdp,embed:fsdp,mlp:tensor,heads:tensor,kv_heads:tensor,"
                 "vocab:tensor,head_dim:,layers:,positions:")

Rules = tuple[tuple[str, tuple[str, ...]], ...]


def parse_rules(spec: str) -> Rules:
  """'batch:data+fsdp,embed:fsdp,layers:' -> (('batch', ('data', 'fsdp')), ...)."""
  rules = []
  for item in filter(None, (s.strip() for s in spec.split(","))):
    if ":" not in item:
      raise ValueError(f"mesh.rules: entry {item!r} is not 'logical:mesh_axis[+mesh_axis]'")
    logical, axes = item.split(":", 1)
    mesh_axes = tuple(a for a in axes.split("+") if a)
    for a in mesh_axes:
      if a not in MESH_AXES:
        raise ValueError(f"mesh.rules: unknown mesh axis {a!r} in {item!r}; valid: "
                         + ", ".join(MESH_AXES))
    rules.append((logical.strip(), mesh_axes))
  return tuple(rules)


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Axis sizes with a single -1 resolved to fill the devices; validated by the caller."""
  sizes = {axis: int(getattr(mesh_cfg, axis)) for axis in MESH_AXES}
  fixed = math.prod(s for s in sizes.values() if s != -1)
  for axis, size in sizes.items():
    if size == -1:
      sizes[axis] = max(num_devices // max(fixed, 1), 1)
  return sizes


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor), all `AxisType.Auto` (sharding propagated by XLA)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  used = devices[: math.prod(shape)]
  return Mesh(np.asarray(used).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Rules) -> PartitionSpec:
  """The PartitionSpec for an array of `shape` whose axes carry logical `names`."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = tuple(a for a in table.get(name, ()) if a not in used and mesh.shape[a] > 1)
    if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      spec.append(axes if len(axes) > 1 else axes[0])
    else:
      spec.append(None)
  return PartitionSpec(*spec)


def state_shardings(abstract_state, mesh: Mesh, rules: Rules):
  """NamedShardings for an abstract `nnx.State` whose Params carry `out_sharding` names.

  Returns a pure dict (the structure of `state.to_pure_dict()`).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def one(var):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return NamedSharding(mesh, logical_to_spec(names, var.shape, mesh, rules))

  shardings = jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.State(shardings).to_pure_dict() if not isinstance(shardings, dict) else shardings


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of [B, T] batch arrays: the batch axis over its rule's mesh axes."""
  axes = tuple(a for a in dict(rules).get("batch", ()) if mesh.shape[a] > 1)
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))


def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
  return math.prod(mesh.shape[a] for a in dict(rules).get("batch", ()))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
