"""Meshes, logical sharding rules, and (in later issues) sequence-parallel ops."""

from longjax.parallel.mesh import (DEFAULT_RULES, MESH_AXES, batch_sharding, data_parallel_size,
                                   logical_to_spec, make_mesh, mesh_shape, parse_rules,
                                   replicated, state_shardings)

__all__ = ["DEFAULT_RULES", "MESH_AXES", "batch_sharding", "data_parallel_size",
           "logical_to_spec", "make_mesh", "mesh_shape", "parse_rules", "replicated",
           "state_shardings"]
