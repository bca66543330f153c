"""Every RoPE scaling and attention-level method trains: a few steps, finite and falling loss.

(Their formulas, prefill == decode identities and references are tested in their own files;
this checks that each one also works as a *training* configuration, e.g. YaRN fine-tuning.)
"""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

from configs import quickstart
from longjax.models import build_model
from longjax.posenc import rope_scaling
from longjax.training import optimizers
from longjax.training.state import TrainState
from tests import testing
from tests.posenc.learned_bias_model_test import _train_step, counting_batch

_ATTENTION_METHODS = {
    "window": {"model.attention.window": 8},
    "sinks": {"model.attention.window": 8, "model.attention.sink_tokens": 2},
    "lm_infinite": {"model.attention.window": 8, "model.attention.sink_tokens": 2,
                    "model.attention.distance_ceiling": 8},
    "log_n": {"model.attention.log_scaling_length": 16},
}
_CASES = ([(f"rope_{name}", {"model.posenc.scaling": name, "model.posenc.factor": 2.0,
                             "model.posenc.original_length": 16})
           for name in sorted(rope_scaling.ROPE_SCALINGS)]
          + list(_ATTENTION_METHODS.items()))


class MethodsTrainTest(parameterized.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_loss_finite_and_falling(self, overrides):
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
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(cfg.train.steps):
      train_state, metrics = _train_step(graphdef, tx, schedule, train_state,
                                         counting_batch(rng, 8, 24, 32))
      losses.append(float(metrics["loss"]))
    self.assertTrue(np.isfinite(losses).all(), losses)
    self.assertLess(np.mean(losses[-3:]), losses[0] - 0.3, losses)


if __name__ == "__main__":
  absltest.main()
