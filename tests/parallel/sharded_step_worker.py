"""Runs 3 train steps on several meshes of 8 fake CPU devices; prints results as JSON.

Executed by sharded_step_test.py in a child process, because the device count must be fixed
before JAX initialises.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position
from longjax.parallel import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
from longjax.training import state as state_lib  # pylint: disable=g-import-not-at-top
from longjax.training import step as step_lib  # pylint: disable=g-import-not-at-top

MESHES = {"one_device": (1, 1, 1), "data8": (8, 1, 1), "data2_fsdp2_tensor2": (2, 2, 2)}


def batches(config, count):
  """The same batch `count` times, so the loss must fall (memorisation)."""
  b, t = config.train.batch_size, config.data.seq_len
  for _ in range(count):
    rng = np.random.RandomState(0)
    tokens = rng.randint(3, 259, (b, t + 1)).astype(np.int32)
    segments = np.where(np.arange(t)[None] < t // 2, 1, 2).repeat(b, 0).astype(np.int32)
    positions = np.where(segments == 1, np.arange(t), np.arange(t) - t // 2).astype(np.int32)
    yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
           "positions": positions, "weights": np.ones((b, t), np.float32)}


def run(name, data, fsdp, tensor):
  config = quickstart.get_config("tiny")
  config.train.batch_size = 8
  config.train.warmup_steps = 1
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
  devices = jax.devices()[: data * fsdp * tensor]
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = mesh_lib.parse_rules(config.mesh.rules)
  tx, schedule = state_lib.make_model_optimizer(config.model, config.train, vocab_size=259)
  graphdef, state, shardings = state_lib.create_train_state(
      config.model, tx, vocab_size=259, mesh=mesh, rules=rules, seed=0)
  batch_sharding = mesh_lib.batch_sharding(mesh, rules)
  step = jax.jit(lambda s, b: step_lib.train_step(graphdef, tx, schedule, s, b),
                 in_shardings=(shardings, batch_sharding), donate_argnums=0)
  losses = []
  for batch in batches(config, 3):
    batch = jax.device_put(batch, batch_sharding)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  params = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v).tolist()
            for path, v in jax.tree_util.tree_leaves_with_path(state.params)}
  sharded = sum(1 for leaf in jax.tree.leaves(state.params)
                if not leaf.sharding.is_fully_replicated)
  return {"losses": losses, "params": params, "num_sharded": sharded,
          "num_devices": len(devices)}


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  json.dump({name: run(name, *shape) for name, shape in MESHES.items()}, sys.stdout)
