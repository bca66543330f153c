"""Optimizer: weight decay only on weight matrices, also when layers are stacked."""

from absl.testing import absltest
import jax

from longjax.training import optimizers, state as state_lib
from tests import testing


class WeightDecayMaskTest(absltest.TestCase):

  def test_mask_by_logical_axes(self):
    cfg = testing.tiny_config(**{"model.posenc.kind": "kerple_log"}).model
    _, abstract = state_lib.model_graphdef(cfg, vocab_size=259)
    mask = optimizers.weight_decay_mask(abstract)
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    decayed = {k for k, v in flat.items() if v}
    # Stacked [layers, D] norm scales and [layers, N] KERPLE parameters are not decayed...
    self.assertTrue(all(not flat[k] for k in flat if "norm" in k or "positional" in k), flat)
    # ...while every projection matrix, the embedding and the head are.
    for name in ("embed", "head", "w_q", "w_kv", "w_out", "w_in"):
      self.assertTrue(any(name in k for k in decayed), name)


if __name__ == "__main__":
  absltest.main()
