"""Optimizer: weight decay only on weight matrices, also when layers are stacked; the fused
clipped AdamW equals optax's chain of clipping and AdamW."""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

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


class ClippedAdamWTest(parameterized.TestCase):

  # Gradient scales below and above the clipping threshold (global norm ~0.1 and ~30).
  @parameterized.parameters(0.01, 3.0)
  def test_equals_optax_chain(self, grad_scale):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(5,)), jnp.float32),
              "stack": {"m": jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)}}
    mask = {"w": True, "b": False, "stack": {"m": True}}
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-2, warmup_steps=2, decay_steps=10,
                                                  end_value=3e-3)
    hyper = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    reference = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, mask=mask, **hyper))
    fused = optimizers.clipped_adamw(schedule, max_norm=1.0, decay_mask=mask, **hyper)
    p_ref, p_fused = params, params
    s_ref, s_fused = reference.init(params), fused.init(params)
    for step in range(6):
      grads = jax.tree.map(
          lambda p, step=step: grad_scale * jnp.asarray(
              np.random.default_rng(step).normal(size=p.shape), jnp.float32), params)
      u_ref, s_ref = reference.update(grads, s_ref, p_ref)
      u_fused, s_fused = jax.jit(fused.update)(grads, s_fused, p_fused)
      p_ref, p_fused = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_fused, u_fused)
      # f32 throughout; the two differ in operation order only (measured <= 2e-7).
      for a, b in zip(jax.tree.leaves(p_fused), jax.tree.leaves(p_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"step {step}")
    self.assertEqual(int(s_fused.count), 6)


if __name__ == "__main__":
  absltest.main()
