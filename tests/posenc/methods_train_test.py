"""Every RoPE scaling, attention-level method and encoding trains: finite and falling loss.

(Their formulas, prefill == decode identities and references are tested in their own files;
this checks that each one also works as a *training* configuration, e.g. YaRN fine-tuning.)
"""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from longjax.posenc import rope_scaling
from tests.models.learned_bias_model_test import train_on_counting

_ATTENTION_METHODS = {
    "window": {"model.attention.window": 8},
    "sinks": {"model.attention.window": 8, "model.attention.sink_tokens": 2},
    "lm_infinite": {"model.attention.window": 8, "model.attention.sink_tokens": 2,
                    "model.attention.distance_ceiling": 8},
    "log_n": {"model.attention.log_scaling_length": 16},
    "learned_sink": {"model.attention.learned_sink": True},
    "softplus": {"model.attention.normalizer": "softplus"},
    # LSSAR through the blockwise op (3 key blocks), so its gradients are the ones trained on.
    "softplus_reweight": {"model.attention.normalizer": "softplus",
                          "model.attention.reweight_power": 15.0,
                          "model.attention.impl": "blockwise", "model.attention.block_size": 8},
}
# Encodings and training-time positions not trained elsewhere (rope: the quickstart; learned
# biases: learned_bias_model_test; xpos, clex: xpos_clex_test).
_ENCODINGS = {
    **{f"kind_{kind}": {"model.posenc.kind": kind}
       for kind in ("nope", "alibi", "sinusoidal", "learned")},
    "randomized": {"model.posenc.train_positions": "randomized",
                   "model.posenc.randomized_max_position": 96},
    "pose": {"model.posenc.train_positions": "pose", "model.posenc.pose_target_length": 96},
}
_CASES = ([(f"rope_{name}", {"model.posenc.scaling": name, "model.posenc.factor": 2.0,
                             "model.posenc.original_length": 16})
           for name in sorted(rope_scaling.ROPE_SCALINGS)]
          + list(_ATTENTION_METHODS.items()) + list(_ENCODINGS.items()))


class MethodsTrainTest(parameterized.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_loss_finite_and_falling(self, overrides):
    losses, _, _ = train_on_counting(overrides, length=24)
    self.assertTrue(np.isfinite(losses).all(), losses)
    self.assertLess(np.mean(losses[-3:]), losses[0] - 0.3, losses)


if __name__ == "__main__":
  absltest.main()
