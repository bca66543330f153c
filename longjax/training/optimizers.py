"""AdamW with linear warmup, cosine decay and global-norm gradient clipping."""

import jax
import optax


def learning_rate_schedule(train_cfg) -> optax.Schedule:
  """0 -> lr over `warmup_steps`, then cosine to `lr * min_lr_ratio` at `steps`."""
  warmup = min(train_cfg.warmup_steps, max(train_cfg.steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(train_cfg.steps, warmup + 1),
      end_value=train_cfg.learning_rate * train_cfg.min_lr_ratio)


def weight_decay_mask(abstract_params) -> dict:
  """True for parameters with at least two axes besides the stacked `layers` axis.

  Weight decay on matrices only: decaying norm scales pulls them towards 0, not towards 1, and
  per-head bias parameters (KERPLE, FIRE) are not weights. The layer stack adds a leading axis,
  so the rule reads the logical axis names instead of `ndim`.

  Args:
    abstract_params: an `nnx.State` whose Params carry `out_sharding` axis names.

  Returns:
    A pure dict of bools with the parameters' structure.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def decays(var) -> bool:
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return sum(1 for n in names if n != "layers") >= 2

  mask = jax.tree.map(decays, abstract_params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.State(mask).to_pure_dict() if not isinstance(mask, dict) else mask


def make_optimizer(train_cfg, *, decay_mask) -> tuple[optax.GradientTransformation,
                                                        optax.Schedule]:
  """AdamW; `decay_mask` (from `weight_decay_mask`) says which parameters are decayed."""
  schedule = learning_rate_schedule(train_cfg)
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                  weight_decay=train_cfg.weight_decay, mask=decay_mask),
  )
  return tx, schedule
