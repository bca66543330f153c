"""Quickstart: a small RoPE byte-level LM on this Python's standard library, CPU-sized.

`python -m experiments.train --config=configs/quickstart.py --workdir=runs/quickstart` trains
for a few minutes on 2 CPU cores, then evaluates loss vs context length (1x..16x the training
length) and writes plots. `configs/quickstart.py:tiny` is a seconds-long version for tests and the
notebook on CPU.
"""

from configs import default


def get_config(arg: str | None = None):
  c = default.get_config()
  c.data.seq_len = 128
  c.model.num_layers = 4
  c.model.width = 256
  c.model.num_heads = 4
  c.model.mlp_hidden = 704
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 30
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.eval.num_sequences = 16
  if arg == "tiny":
    c.data.seq_len = 32
    c.model.num_layers = 2
    c.model.width = 64
    c.model.num_heads = 2
    c.model.mlp_hidden = 128
    c.train.steps = 20
    c.train.batch_size = 4
    c.train.warmup_steps = 5
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.train.eval_batches = 2
    c.eval.lengths = "1x,2x,4x"
    c.eval.num_sequences = 4
  elif arg:
    raise ValueError(f"configs/quickstart.py: unknown argument {arg!r}; valid: '' or 'tiny'")
  return c
