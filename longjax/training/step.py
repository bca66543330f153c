"""Pure train and eval steps: (state, batch) -> (state, metrics)."""

from collections.abc import Callable

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from longjax.training import losses
from longjax.training.state import TrainState


def _forward(graphdef, params, batch):
  model = nnx.merge(graphdef, params)
  logits, _ = model(batch["inputs"], positions=batch["positions"],
                    segment_ids=batch["segment_ids"])
  return logits


def train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule,
               state: TrainState, batch: dict, *,
               position_transform: Callable[..., jax.Array] | None = None,
               position_seed: int = 0) -> tuple[TrainState, dict]:
  """One AdamW step on the mean token loss of `batch`.

  Args:
    graphdef: the model's static structure (`longjax.training.state.model_graphdef`).
    tx, schedule: from `longjax.training.optimizers.make_optimizer`.
    state: the current train state.
    batch: inputs, targets, positions, segment_ids [B, T] int32; weights [B, T] float32.
    position_transform: `(positions, segment_ids, rng) -> positions` applied to the batch's
      positions (`longjax.posenc.make_position_transform`); None keeps them.
    position_seed: seed of the transform's randomness.

  Returns:
    (new state, metrics: loss, grad_norm, param_norm, lr, tokens).
  """
  if position_transform is not None:
    # The key is a function of the step alone, so a resumed run draws the same positions as an
    # uninterrupted one without an RNG in the checkpoint.
    rng = jax.random.fold_in(jax.random.key(position_seed), state.step)
    batch = dict(batch, positions=position_transform(batch["positions"], batch["segment_ids"],
                                                     rng))

  def loss_fn(params):
    logits = _forward(graphdef, params, batch)
    total, count = losses.weighted_cross_entropy(logits, batch["targets"], batch["weights"])
    return total / jnp.maximum(count, 1.0), count

  (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # The new parameters' norm catches a step whose loss was finite but whose parameters are not
  # (e.g. an overflowing learning rate): such a state must never be checkpointed. (The norm of
  # `updates` would say the same but makes XLA write the updates out instead of fusing them
  # into the optimizer's single pass: +0.25 s per step at 102M parameters on the CPU.)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
             "param_norm": optax.global_norm(params), "lr": schedule(state.step),
             "tokens": count}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(graphdef, params, batch: dict) -> dict:
  """Summed loss and weight of a batch (sum, so that batches combine exactly)."""
  logits = _forward(graphdef, params, batch)
  total, count = losses.weighted_cross_entropy(logits, batch["targets"], batch["weights"])
  return {"loss_sum": total, "weight_sum": count}


def _document_logits(graphdef, params, inputs: jax.Array) -> jax.Array:
  model = nnx.merge(graphdef, params)
  if model.evaluates_with_cache:
    # Landmark models and retrieval policies are evaluated as they decode: each token attends
    # to what the cache gives it (`longjax.layers.landmark`, `longjax.layers.retrieval`),
    # through a prefill into a cache.
    logits, _ = model(inputs, cache=model.init_cache(*inputs.shape))
  else:
    logits, _ = model(inputs)
  return logits


def token_losses(graphdef, params, tokens: jax.Array) -> jax.Array:
  """Per-position losses of single documents: tokens [B, T+1] -> [B, T] float32 nats."""
  logits = _document_logits(graphdef, params, tokens[:, :-1])
  return losses.token_cross_entropy(logits, tokens[:, 1:])


def token_predictions(graphdef, params, tokens: jax.Array) -> jax.Array:
  """Greedy next-token predictions of single documents: tokens [B, T+1] -> int32 [B, T].

  Prediction t is the argmax after tokens [0, t]: where every scored target of a sequence
  equals its prediction, greedy decoding from the prompt writes exactly that answer.
  """
  logits = _document_logits(graphdef, params, tokens[:, :-1])
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)
