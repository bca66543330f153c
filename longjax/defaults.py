"""Every config field longjax reads, with its default. Configs in `configs/` start from this.

Sections: model, data, train, eval, mesh. Field names are stable: docs and scripts rely on them.
The defaults live in the library (not in `configs/`) because a saved run's config.json is read
back on top of them: a run saved before a field existed gets that field's default.
"""

import ml_collections

from longjax.parallel.mesh import DEFAULT_RULES


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameter initialisation

  c.data = ml_collections.ConfigDict()
  c.data.source_dir = ""            # folder of text files; "" = this Python's standard library
  c.data.glob = "**/*.py"           # which files of source_dir
  c.data.validation_percent = 5     # files (by a hash of their path) held out for validation
  c.data.tfds_dir = "~/.cache/longjax/tensorflow_datasets"  # where the array_record build goes
  c.data.tokenizer = "byte"         # byte | sentencepiece
  c.data.vocab_size = 1024          # sentencepiece only
  c.data.seq_len = 256              # training length T
  c.data.seed = 0                   # document shuffling

  c.model = ml_collections.ConfigDict()
  c.model.mixers = "attention"      # per-layer pattern, repeated to num_layers
  c.model.num_layers = 4
  c.model.width = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 0          # 0 = num_heads (MHA); fewer = GQA
  c.model.head_dim = 0              # 0 = width // num_heads
  c.model.mlp_hidden = 704          # SwiGLU hidden width (~ 8/3 * width)
  c.model.tie_embeddings = False
  c.model.dtype = "float32"         # compute dtype: float32 | bfloat16 (parameters stay float32)
  c.model.remat = "none"            # none | full | dots | dots_no_batch
  c.model.posenc = ml_collections.ConfigDict()
  c.model.posenc.kind = "rope"      # rope | alibi | nope | sinusoidal | learned
  c.model.posenc.rope_theta = 10_000.0
  c.model.posenc.max_length = 2048  # rows of the learned table (>= data.seq_len)
  c.model.attention = ml_collections.ConfigDict()
  c.model.attention.impl = "auto"   # auto | reference | blockwise
  c.model.attention.block_size = 0  # blockwise key/query block; 0 = the op's default
  c.model.attention.log_scaling_length = 0  # L > 0: logits x max(1, log_L(position + 1))
  c.model.attention.window = 0      # > 0: sliding-window attention over this many keys
  c.model.attention.sink_tokens = 0  # with a window: first k keys always visible; streaming cache

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 16
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 50
  c.train.min_lr_ratio = 0.1
  c.train.weight_decay = 0.1
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.grad_clip = 1.0
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3
  c.train.eval_every = 0            # validation loss every N steps; 0 = only at the end
  c.train.eval_batches = 8          # validation batches of train.batch_size x data.seq_len

  c.eval = ml_collections.ConfigDict()
  c.eval.lengths = "1x,2x,4x,8x,16x"  # context lengths: Nx = N * data.seq_len, or token counts
  c.eval.num_sequences = 16         # validation documents evaluated at every length
  c.eval.batch_size = 4

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                  # -1 = all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = DEFAULT_RULES      # logical axis -> mesh axes
  return c
