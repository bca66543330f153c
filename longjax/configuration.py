"""Config validation and (de)serialisation.

`ConfigError` lives in `longjax.errors` (so that mixer specs can raise it) and is re-exported
here.

`validate(config, num_devices)` runs before a run writes anything. Each mistake becomes a
`ConfigError` whose one-line message names the field, the bad value and the valid choices; the
entry points print it without a traceback.
"""

import json
import math
import os

import ml_collections

from longjax import posenc
from longjax.data import tasks as tasks_lib
from longjax.errors import ConfigError
from longjax.layers import mixer as mixer_lib
from longjax.layers.positional import POSENCS, rope_scaling_hyperparameters
from longjax.models import registry
from longjax.models.lm import REMAT_POLICIES
from longjax.parallel import mesh as mesh_lib

TOKENIZERS = ("byte", "sentencepiece")
# Positional encodings that rotate queries and keys (RoPE's fields apply to them).
ROTARY_KINDS = ("rope", "xpos", "clex")


def parse_eval_lengths(spec: str, seq_len: int) -> list[int]:
  """'1x,2x,512' -> [seq_len, 2 * seq_len, 512], sorted and de-duplicated."""
  lengths = []
  for item in filter(None, (s.strip() for s in str(spec).split(","))):
    try:
      value = int(item[:-1]) * seq_len if item.endswith("x") else int(item)
    except ValueError:
      raise ConfigError("eval.lengths", spec, f"cannot parse {item!r}",
                        ["Nx (N times data.seq_len)", "a token count"]) from None
    if value <= 0:
      raise ConfigError("eval.lengths", spec, f"{item!r} is not positive")
    lengths.append(value)
  if not lengths:
    raise ConfigError("eval.lengths", spec, "no lengths given")
  return sorted(set(lengths))


def _positive(config, field: str):
  section, name = field.split(".")
  _positive_field(field, config[section][name])


def _positive_field(field: str, value):
  if not isinstance(value, (int, float)) or value <= 0:
    raise ConfigError(field, value, "must be positive")


def _choice(field: str, value, choices):
  if value not in choices:
    raise ConfigError(field, value, "unknown choice", sorted(choices))


def validate_model(model) -> None:
  """Checks `config.model` alone (also used by evaluate/sample on saved runs): the shared
  sizes and the positional encoding here, each mixer's section by its own spec."""
  pattern = registry.parse_mixers(model.mixers, model)
  _choice("model.posenc.kind", model.posenc.kind, POSENCS)
  _choice("model.dtype", model.dtype, registry.DTYPES)
  _choice("model.remat", model.remat, REMAT_POLICIES)
  if not model.scan_layers and model.remat != "none":
    # Outside the scan XLA schedules each layer's recomputation right after its forward, which
    # keeps every activation alive: d1024 L8 T8192, remat=full, 1842 MiB scanned, 6081 unrolled.
    raise ConfigError("model.scan_layers", model.scan_layers,
                      f"model.remat={model.remat!r} needs the layer scan (scan_layers=True)")
  for name in ("num_layers", "width", "num_heads"):
    if model[name] <= 0:
      raise ConfigError(f"model.{name}", model[name], "must be positive")
  if model.mlp_hidden < 0:
    raise ConfigError("model.mlp_hidden", model.mlp_hidden,
                      "must be >= 0 (0 = no MLP: mixer-only layers, as Mamba's models)")
  if model.head_dim < 0:
    raise ConfigError("model.head_dim", model.head_dim,
                      "must be >= 0 (0 = model.width // model.num_heads)")
  if model.num_layers % len(pattern):
    raise ConfigError("model.num_layers", model.num_layers,
                      f"must be a multiple of the {len(pattern)}-layer pattern "
                      f"model.mixers={model.mixers!r}")
  if not model.head_dim and model.width % model.num_heads:
    raise ConfigError("model.num_heads", model.num_heads,
                      f"must divide model.width={model.width} (or set model.head_dim)")
  kv_heads = model.num_kv_heads or model.num_heads
  if kv_heads < 0 or model.num_heads % kv_heads:
    raise ConfigError("model.num_kv_heads", model.num_kv_heads,
                      f"must divide model.num_heads={model.num_heads}")
  head_dim = registry.head_dim(model)
  if model.posenc.kind in ROTARY_KINDS and head_dim % 2:
    raise ConfigError("model.head_dim", head_dim, f"{model.posenc.kind} needs an even head dim")
  _validate_rope(model.posenc, head_dim)
  if model.posenc.kind == "sinusoidal" and model.width % 2:
    raise ConfigError("model.width", model.width, "sinusoidal encoding needs an even width")
  _validate_learned_bias(model.posenc)
  for index, entry in enumerate(pattern):
    entry.spec.validate(model, entry.config(model), entry.field_prefix(index))
  mixer_lib.landmark_block(pattern, model)
  if model.attention.retrieval != "none" and not any(
      entry.spec.section == "attention" for entry in pattern):
    # The field would silently change nothing (e.g. model.mixers="retnet").
    raise ConfigError("model.attention.retrieval", model.attention.retrieval,
                      f"applies to softmax attention layers, and model.mixers="
                      f"{model.mixers!r} has none", ["none"])


def _validate_learned_bias(p) -> None:
  """`model.posenc` fields of the learned logit biases (t5, fire)."""
  if p.kind == "t5":
    sides = 2 if p.t5_bidirectional else 1
    if p.t5_num_buckets < 2 * sides or p.t5_num_buckets % sides:
      raise ConfigError("model.posenc.t5_num_buckets", p.t5_num_buckets,
                        "must be >= 2" + (" and even, >= 4, with t5_bidirectional" if sides > 1
                                          else ""))
    exact = p.t5_num_buckets // (2 * sides)  # distances with a bucket of their own
    if p.t5_max_distance <= exact:
      raise ConfigError("model.posenc.t5_max_distance", p.t5_max_distance,
                        f"must exceed the {exact} distances that have a bucket of their own")
  if p.kind == "fire":
    for name in ("fire_hidden", "fire_c_init", "fire_threshold_init"):
      if not isinstance(p[name], (int, float)) or p[name] <= 0:
        raise ConfigError(f"model.posenc.{name}", p[name], "must be positive")


def _validate_rope(p, head_dim: int) -> None:
  """`model.posenc` fields of RoPE: partial rotary and the context-extension scaling."""
  _choice("model.posenc.scaling", p.scaling, posenc.ROPE_SCALINGS)
  if p.scaling != "none" and p.kind != "rope":
    raise ConfigError("model.posenc.scaling", p.scaling,
                      f"rescales RoPE, but model.posenc.kind={p.kind!r}", ["none"])
  if not isinstance(p.factor, (int, float)) or p.factor <= 0:
    raise ConfigError("model.posenc.factor", p.factor, "must be positive")
  if not 0 < p.rotary_fraction <= 1:
    raise ConfigError("model.posenc.rotary_fraction", p.rotary_fraction, "must be in (0, 1]")
  if p.original_length < 0:
    raise ConfigError("model.posenc.original_length", p.original_length,
                      "must be >= 0 (0 = the run's data.seq_len)")
  if p.kind not in ROTARY_KINDS:
    return
  try:
    rotary = posenc.rotary_dim(head_dim, p.rotary_fraction)
  except ValueError:
    raise ConfigError("model.posenc.rotary_fraction", p.rotary_fraction,
                      f"rotates no feature pair of the head dim {head_dim}") from None
  if p.kind == "xpos":
    for name in ("xpos_gamma", "xpos_scale_base"):
      if not isinstance(p[name], (int, float)) or p[name] <= 0:
        raise ConfigError(f"model.posenc.{name}", p[name], "must be positive")
  if p.kind == "clex":
    if rotary < 4:
      raise ConfigError("model.posenc.rotary_fraction", p.rotary_fraction,
                        f"CLEX needs >= 4 rotated features, this rotates {rotary}")
    for name in ("clex_max_factor", "clex_hidden_factor"):
      if not isinstance(p[name], int) or p[name] < 1:
        raise ConfigError(f"model.posenc.{name}", p[name], "must be an integer >= 1")
  if p.kind != "rope":
    return
  if not p.original_length and p.scaling in posenc.rope_scaling.NEEDS_ORIGINAL_LENGTH:
    raise ConfigError("model.posenc.original_length", p.original_length,
                      f"scaling {p.scaling!r} needs the training length it extends (a saved "
                      "run's 0 becomes its data.seq_len; elsewhere set it)")
  try:
    posenc.scaled_rope_frequencies(p.scaling, rotary, theta=p.rope_theta, factor=p.factor,
                                   original_length=p.original_length,
                                   **rope_scaling_hyperparameters(p))
  except ValueError as e:
    raise ConfigError("model.posenc.scaling", p.scaling, str(e)) from None


def validate(config, num_devices: int) -> None:
  """Raises ConfigError for the first bad field of a training config."""
  validate_model(config.model)
  _choice("data.tokenizer", config.data.tokenizer, TOKENIZERS)
  for field in ("data.seq_len", "train.steps", "train.batch_size", "train.learning_rate",
                "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                "eval.num_sequences", "eval.batch_size"):
    _positive(config, field)
  if config.data.source_dir and not os.path.isdir(os.path.expanduser(config.data.source_dir)):
    raise ConfigError("data.source_dir", config.data.source_dir, "is not a directory")
  if not 0 < config.data.validation_percent < 100:
    raise ConfigError("data.validation_percent", config.data.validation_percent,
                      "must be in 1..99")
  if config.data.tokenizer == "sentencepiece" and config.data.vocab_size < 260:
    raise ConfigError("data.vocab_size", config.data.vocab_size,
                      "sentencepiece needs >= 260 (256 byte-fallback pieces + specials)")
  if config.train.warmup_steps < 0:
    raise ConfigError("train.warmup_steps", config.train.warmup_steps, "must be >= 0")
  _validate_optimizer(config.train)
  if config.train.eval_every < 0:
    raise ConfigError("train.eval_every", config.train.eval_every, "must be >= 0 (0 = at end)")
  if config.model.posenc.kind == "learned" and config.model.posenc.max_length < config.data.seq_len:
    raise ConfigError("model.posenc.max_length", config.model.posenc.max_length,
                      f"the learned table must cover data.seq_len={config.data.seq_len}")
  _validate_train_positions(config.model.posenc, config.data.seq_len)
  validate_eval_lengths(config)
  validate_task(config)
  _validate_mesh(config, num_devices)


def validate_task(config) -> None:
  """`config.task` (and `eval.tasks`, which may name a task's grid) for training or evaluation."""
  task = config.task
  tasks_lib.parse_depths(task.depths)
  if not task.name:
    return
  spec = tasks_lib.get(task.name)
  spec.validate(task[spec.name])
  tasks_lib.parse_sizes("task.train_sizes", task.train_sizes)
  tasks_lib.parse_sizes("task.test_sizes", task.test_sizes)
  for field in ("num_train", "num_validation"):
    _positive_field(f"task.{field}", task[field])
  tasks_lib.require_byte_tokenizer(config)


def checked(config, num_devices: int) -> ml_collections.ConfigDict:
  """A copy of a training config with its references and lengths resolved, validated (raises
  ConfigError for the first bad field)."""
  config = config.copy_and_resolve_references()
  resolve_lengths(config)
  validate(config, num_devices)
  return config


def _validate_optimizer(train) -> None:
  """AdamW's and the schedule's fields (`longjax.training.optimizers`)."""
  for name in ("eval_batches", "grad_clip", "eps"):
    _positive_field(f"train.{name}", train[name])
  for name in ("b1", "b2"):
    if not 0 <= train[name] < 1:
      raise ConfigError(f"train.{name}", train[name], "must be in [0, 1)")
  if train.weight_decay < 0:
    raise ConfigError("train.weight_decay", train.weight_decay, "must be >= 0")
  if not 0 <= train.min_lr_ratio <= 1:
    raise ConfigError("train.min_lr_ratio", train.min_lr_ratio, "must be in [0, 1]")


def validate_eval_lengths(config) -> list[int]:
  """Parses `eval.lengths` and checks that the model can represent the longest one."""
  lengths = parse_eval_lengths(config.eval.lengths, config.data.seq_len)
  p = config.model.posenc
  if p.kind == "xpos":
    limit = posenc.xpos.max_position(p.xpos_gamma, p.xpos_scale_base)
    if max(lengths) > limit:
      raise ConfigError("model.posenc.xpos_scale_base", p.xpos_scale_base,
                        f"xPos scales overflow float32 beyond position {limit}, below the "
                        f"evaluation length {max(lengths)}; raise it")
  return lengths


def _validate_train_positions(p, seq_len: int) -> None:
  """`model.posenc` fields of the training-time position transforms (randomized, PoSE, CLEX)."""
  _choice("model.posenc.train_positions", p.train_positions, posenc.POSITION_TRANSFORMS)
  if (p.kind == "clex") != (p.train_positions == "clex"):
    # CLEX's ODE only gets a gradient at sampled scales t > 1, which only this transform makes.
    raise ConfigError("model.posenc.train_positions", p.train_positions,
                      f"CLEX trains with, and only with, train_positions='clex' (model.posenc."
                      f"kind={p.kind!r})")
  if p.kind == "clex" and p.original_length not in (0, seq_len):
    raise ConfigError("model.posenc.original_length", p.original_length,
                      f"CLEX's scale is relative to the training length data.seq_len={seq_len}"
                      " (set 0)")
  if p.train_positions in ("none", "clex"):
    return
  if p.scaling in posenc.rope_scaling.DYNAMIC_SCALINGS:
    # Dynamic NTK recomputes frequencies from the largest position, which the transform inflates.
    raise ConfigError("model.posenc.train_positions", p.train_positions,
                      f"cannot be combined with model.posenc.scaling={p.scaling!r}, which "
                      "derives its frequencies from the largest position")
  if p.train_positions == "randomized":
    field, largest = "model.posenc.randomized_max_position", p.randomized_max_position
  else:
    if not isinstance(p.pose_chunks, int) or p.pose_chunks < 1:
      raise ConfigError("model.posenc.pose_chunks", p.pose_chunks, "must be an integer >= 1")
    field, largest = "model.posenc.pose_target_length", p.pose_target_length
  if not isinstance(largest, int) or largest < seq_len:
    raise ConfigError(field, largest, f"must be an integer >= data.seq_len={seq_len}")
  # A learned table clamps positions past its last row, which would merge the sampled ones.
  if p.kind == "learned" and largest > p.max_length:
    raise ConfigError(field, largest, "exceeds the learned table: positions would be clamped to "
                      f"its last row (model.posenc.max_length={p.max_length})")


def _validate_mesh(config, num_devices: int) -> None:
  sizes = {a: config.mesh[a] for a in mesh_lib.MESH_AXES}
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}", size, "must be positive or -1 (fill the devices)")
  if list(sizes.values()).count(-1) > 1:
    raise ConfigError("mesh", sizes, "at most one axis may be -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fixed > num_devices:
    raise ConfigError("mesh", sizes, f"needs {fixed} devices but only {num_devices} exist")
  try:
    rules = mesh_lib.parse_rules(config.mesh.rules)
  except ValueError as e:
    raise ConfigError("mesh.rules", config.mesh.rules, str(e).split(": ", 1)[-1]) from None
  resolved = mesh_lib.mesh_shape(config.mesh, num_devices)
  data_parallel = math.prod(resolved[a] for a in dict(rules).get("batch", ()))
  if config.train.batch_size % data_parallel:
    raise ConfigError("train.batch_size", config.train.batch_size,
                      f"must be divisible by the {data_parallel} data-parallel devices "
                      f"(mesh {resolved})")


def resolve_lengths(config) -> None:
  """Fills, in place, fields whose 0 means "the run's data.seq_len" (model.posenc.original_length).

  The model is built from `config.model` alone, so this is resolved where the data and model
  sections meet: before training writes config.json, and when a saved run is loaded.
  """
  if not config.model.posenc.original_length:
    config.model.posenc.original_length = config.data.seq_len


def to_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(json.loads(text))
