"""Every config field longjax reads, with its default. Configs in `configs/` start from this.

Sections: data, task, model, train, eval, mesh. Field names are stable: docs and scripts rely on
them.
Each mixer's section of `model` (e.g. `model.attention`) is declared by the mixer's own module
(its `MixerSpec`, `longjax/layers/attention_config.py`) and added here from the registry.
The defaults live in the library (not in `configs/`) because a saved run's config.json is read
back on top of them: a run saved before a field existed gets that field's default.
"""

import ml_collections

from longjax.data import tasks
from longjax.models import registry
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

  # A synthetic task instead of the text above (longjax/data/tasks, docs/tasks.md).
  c.task = tasks.default_task_config()

  c.model = ml_collections.ConfigDict()
  # Per-layer pattern, repeated to num_layers; an entry may override its mixer's section for
  # that layer: "attention(window=256),attention" (longjax/layers/mixer.py).
  c.model.mixers = "attention"
  c.model.num_layers = 4
  c.model.width = 256
  c.model.num_heads = 4
  c.model.num_kv_heads = 0          # 0 = num_heads (MHA); fewer = GQA
  c.model.head_dim = 0              # 0 = width // num_heads
  c.model.mlp_hidden = 704          # SwiGLU hidden width (~ 8/3 * width); 0 = no MLP
  c.model.tie_embeddings = False
  c.model.dtype = "float32"         # compute dtype: float32 | bfloat16 (parameters stay float32)
  c.model.remat = "none"            # none | full | dots | dots_no_batch
  c.model.scan_layers = True        # False: unrolled, faster and leaner, compile time ~ depth
  c.model.posenc = ml_collections.ConfigDict()
  # rope | xpos | clex | alibi | nope | sinusoidal | learned | t5 | kerple_log | kerple_power | fire
  c.model.posenc.kind = "rope"
  c.model.posenc.rope_theta = 10_000.0
  c.model.posenc.max_length = 2048  # rows of the learned table (>= data.seq_len)
  # Learned logit biases (docs/positional_encodings.md), each per layer and head:
  c.model.posenc.t5_num_buckets = 32    # t5: distance buckets (bidirectional: half per side)
  c.model.posenc.t5_max_distance = 128  # t5: distances >= this share the last bucket
  c.model.posenc.t5_bidirectional = False  # t5: own buckets for keys after the query
  c.model.posenc.fire_hidden = 32       # fire: hidden width of the MLP f
  c.model.posenc.fire_c_init = 0.1      # fire: initial c in psi(x) = log(c x + 1)
  c.model.posenc.fire_threshold_init = 512.0  # fire: initial threshold L in psi(max(L, i))
  c.model.posenc.rotary_fraction = 1.0  # rope, xpos, clex: share of features rotated, in (0, 1]
  c.model.posenc.xpos_gamma = 0.4       # xpos: decay rates (2i/R + gamma) / (1 + gamma)
  c.model.posenc.xpos_scale_base = 512.0  # xpos: decay per B tokens of distance
  c.model.posenc.clex_max_factor = 8    # clex: training samples scales t in 1..this
  c.model.posenc.clex_hidden_factor = 1  # clex: ODE MLP hidden width = this * rotated features
  # RoPE scalings (training-free context extension, docs/positional_encodings.md):
  # none | linear | abf | ntk | dynamic_ntk | yarn | llama3 | giraffe_power | giraffe_truncated
  c.model.posenc.scaling = "none"
  c.model.posenc.factor = 1.0       # s = target length / original_length
  c.model.posenc.original_length = 0  # length the scaling extends; 0 = the run's data.seq_len
  c.model.posenc.abf_base = 0.0     # new base; 0 = rope_theta * factor
  c.model.posenc.yarn_beta_fast = 32.0  # YaRN's beta: keep frequencies turning > 32x in L
  c.model.posenc.yarn_beta_slow = 1.0   # YaRN's alpha: interpolate those turning < 1x in L
  c.model.posenc.llama3_low_freq_factor = 1.0
  c.model.posenc.llama3_high_freq_factor = 4.0
  c.model.posenc.giraffe_power_exponent = 0.5  # k in theta_i * (1 - 2i/d)^k
  c.model.posenc.giraffe_truncated_cutoff = 0  # keep frequencies turning once in it; 0 = L
  c.model.posenc.giraffe_truncated_a_ratio = 8.0  # a = b / 8: below a, frequency 0
  c.model.posenc.giraffe_truncated_rho_ratio = 16.0  # between a and b, rho = b / 16
  # Training-time positions (docs/positional_encodings.md); evaluation always uses 0..n-1:
  c.model.posenc.train_positions = "none"  # none | randomized | pose | clex (kind=clex only)
  c.model.posenc.randomized_max_position = 2048  # randomized: positions drawn from [0, this)
  c.model.posenc.pose_chunks = 2    # pose: chunks per document, each shifted by a skip bias
  c.model.posenc.pose_target_length = 2048  # pose: positions stay < this (the target context)
  # Each mixer's own section (e.g. c.model.attention), with the defaults its module declares.
  for spec in registry.MIXERS.values():
    c.model[spec.section] = spec.defaults()

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
  c.eval.num_sequences = 16         # documents per length; task examples per size or grid cell
  c.eval.batch_size = 4
  # perplexity | accuracy | passkey | needle (longjax/eval/harness.py); "" = the run's own:
  # accuracy or the grid of its task, perplexity for text.
  c.eval.tasks = ""

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                  # -1 = all devices not used by the other axes
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.rules = DEFAULT_RULES      # logical axis -> mesh axes
  return c
