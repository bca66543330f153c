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


def _decay_mask(params):
  # Weight decay on matrices only: decaying norm scales pulls them towards 0, not towards 1.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(train_cfg)
  tx = optax.chain(
      optax.clip_by_global_norm(train_cfg.grad_clip),
      optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                  weight_decay=train_cfg.weight_decay, mask=_decay_mask),
  )
  return tx, schedule
