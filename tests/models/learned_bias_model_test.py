"""Learned logit biases in the model: decode with a KV cache, and training moves their parameters.

The biases are functions of the cached key positions, so prefill and token-by-token decode must
agree; training must reach the bias parameters (through the blockwise custom VJP here).
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from configs import quickstart
from longjax import posenc
from longjax.layers import positional_bias
from longjax.models import build_model
from longjax.training import optimizers
from longjax.training.state import TrainState
from longjax.training.step import train_step
from tests import testing
from tests.models.lm_test import TOLERANCE
from tests.models.lm_test import _forward
from tests.models.lm_test import decode_one_by_one
from tests.models.lm_test import tiny_model_config

KINDS = tuple(positional_bias.FACTORIES)


def positional_params(params) -> dict:
  """The positional module's parameters of the (single) attention layer group."""
  return params["groups"][0]["mixer"]["positional"]


def randomise_positional(params, seed: int):
  """Moves every bias parameter off its initial value (T5's table starts at zero)."""
  state = nnx.State(params).to_pure_dict() if not isinstance(params, dict) else params
  rng = np.random.default_rng(seed)
  pos = positional_params(state)
  for name, value in pos.items():
    pos[name] = value + jnp.asarray(rng.normal(scale=0.3, size=value.shape), value.dtype)
  return state


class LearnedBiasDecodeTest(parameterized.TestCase):

  # Blockwise with blocks of 4 for two of them: the cache's q_offset and key positions then go
  # through the blockwise op; the others resolve to the dense reference.
  @parameterized.parameters(("t5", "blockwise"), ("kerple_log", "auto"),
                            ("kerple_power", "blockwise"), ("fire", "auto"))
  def test_prefill_equals_token_by_token_decode(self, kind, impl):
    cfg = tiny_model_config(**{"posenc.kind": kind, "num_kv_heads": 2, "attention.impl": impl,
                               "attention.block_size": 4,
                               "posenc.fire_threshold_init": 4.0})  # interpolation within 11
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.State(randomise_positional(state.to_pure_dict(), seed=1))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 11)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    decoded, _ = decode_one_by_one(graphdef, params, tokens, model.init_cache(2, 16))
    np.testing.assert_allclose(decoded, full, atol=TOLERANCE["float32"], rtol=0)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _train_step(graphdef, tx, schedule, position_transform, state, batch):
  return train_step(graphdef, tx, schedule, state, batch, position_transform=position_transform)


def counting_batch(rng, batch: int, length: int, vocab: int) -> dict:
  """Rows that count up mod `vocab` from a random start: learnable in a few steps."""
  start = rng.integers(0, vocab, (batch, 1))
  tokens = jnp.asarray((start + np.arange(length + 1)) % vocab, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
          "segment_ids": jnp.ones((batch, length), jnp.int32),
          "weights": jnp.ones((batch, length), jnp.float32)}


def train_on_counting(overrides: dict, *, length: int):
  """12 AdamW steps of a 1-layer tiny model on counting rows of `length` tokens.

  Training-time positions (`model.posenc.train_positions`) are applied as the trainer does.

  Returns:
    (losses, initial parameters, final parameters).
  """
  cfg = quickstart.get_config("tiny")
  testing.apply_overrides(cfg, {"model.num_layers": 1, "model.width": 32, "model.num_heads": 4,
                                "model.mlp_hidden": 48, "train.steps": 12,
                                "train.warmup_steps": 2, "train.learning_rate": 1e-2,
                                **overrides})
  model = build_model(cfg.model, vocab_size=32, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = state.to_pure_dict()
  tx, schedule = optimizers.make_optimizer(
      cfg.train, decay_mask=optimizers.weight_decay_mask(state))
  train_state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params))
  transform = posenc.make_position_transform(cfg.model.posenc)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(cfg.train.steps):
    train_state, metrics = _train_step(graphdef, tx, schedule, transform, train_state,
                                       counting_batch(rng, 8, length, 32))
    losses.append(float(metrics["loss"]))
  return losses, params, train_state.params


class LearnedBiasTrainingTest(parameterized.TestCase):

  @parameterized.parameters(*KINDS)
  def test_loss_falls_and_bias_parameters_move(self, kind):
    losses, initial, final = train_on_counting(
        {"model.posenc.kind": kind, "model.attention.impl": "blockwise",
         "model.attention.block_size": 16}, length=40)
    self.assertTrue(np.isfinite(losses).all(), losses)
    self.assertLess(np.mean(losses[-3:]), losses[0] - 0.3, losses)
    before, after = positional_params(initial), positional_params(final)
    for name in before:
      if name == "b2":  # FIRE's output bias shifts a head's logits uniformly: no gradient
        continue
      moved = float(jnp.abs(after[name] - before[name]).max())
      self.assertGreater(moved, 1e-4, f"{kind}: {name} did not move")


if __name__ == "__main__":
  absltest.main()
