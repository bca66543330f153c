"""What the studies' configs share: a decoder of a given size, trained for a given budget."""

from configs import default


def decoder(*, layers: int, width: int, steps: int, batch: int, learning_rate: float,
            warmup: int = 50):
  """The default config with a `layers` x `width` decoder (32-dim heads, SwiGLU of ~2.75x)
  trained `steps` steps of `batch` rows; checkpoints at the half and the end (a smoke run of a
  few steps: at the end only)."""
  c = default.get_config()
  c.model.num_layers = layers
  c.model.width = width
  c.model.num_heads = max(2, width // 32)
  c.model.mlp_hidden = width * 11 // 4
  c.train.steps = steps
  c.train.batch_size = batch
  c.train.learning_rate = learning_rate
  c.train.warmup_steps = min(warmup, steps)
  c.train.log_every = min(100, steps)
  c.train.checkpoint_every = steps // 2 if steps >= 100 else steps  # smoke: one save
  c.train.eval_batches = 2
  return c
