"""The train state and its sharded creation.

The state is a plain pytree of arrays (parameters as a nested dict, `nnx.State.to_pure_dict()`),
so orbax, optax and jit see nothing Flax-specific; the static `graphdef` rebuilds the NNX model
inside the step. Creation follows big_vision: shapes with `jax.eval_shape`, shardings from the
parameters' logical axis names, then one `jax.jit(init, out_shardings=...)` that materialises
every array directly on its devices.
"""

import dataclasses
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from longjax.models import build_model
from longjax.parallel import mesh as mesh_lib
from longjax.training import optimizers


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array      # int32 scalar: optimizer steps taken
  params: Any          # nested dict of float32 arrays
  opt_state: Any       # optax state


def model_graphdef(model_cfg, vocab_size: int):
  """(graphdef, abstract nnx.State) without allocating parameters."""
  abstract = nnx.eval_shape(lambda: build_model(model_cfg, vocab_size=vocab_size,
                                                rngs=nnx.Rngs(0)))
  return nnx.split(abstract)


def make_model_optimizer(model_cfg, train_cfg, *, vocab_size: int):
  """`optimizers.make_optimizer` with the weight-decay mask of this model's parameters."""
  _, abstract_params = model_graphdef(model_cfg, vocab_size)
  return optimizers.make_optimizer(
      train_cfg, decay_mask=optimizers.weight_decay_mask(abstract_params))


def create_train_state(model_cfg, tx: optax.GradientTransformation, *, vocab_size: int,
                       mesh: jax.sharding.Mesh, rules: mesh_lib.Rules, seed: int):
  """Initialises a sharded train state.

  Returns:
    (graphdef, state, state_shardings): `state` lives on `mesh`; `state_shardings` has its
    structure and is what jit's in/out_shardings and orbax restore use.
  """
  graphdef, abstract_params = model_graphdef(model_cfg, vocab_size)
  param_shardings = mesh_lib.state_shardings(abstract_params, mesh, rules)

  def init(rng):
    model = build_model(model_cfg, vocab_size=vocab_size, rngs=nnx.Rngs(rng))
    params = nnx.state(model).to_pure_dict()
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract_state = jax.eval_shape(init, jax.random.key(seed))
  replicated = mesh_lib.replicated(mesh)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_state.opt_state, param_shardings,
      transform_non_params=lambda _: replicated)
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
  return graphdef, state, shardings
