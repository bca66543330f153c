"""Config validation: each mistake is one line naming the field, the value and the choices."""

import os

from absl.testing import absltest
from absl.testing import parameterized

from longjax import configuration
from longjax.layers.positional import POSENCS
from tests import testing

# (override, field named in the message, a fragment of the message)
BAD_VALUES = [
    ({"model.mixers": "attention,lstm"}, "model.mixers", "unknown mixer 'lstm'; valid: attention"),
    ({"model.posenc.kind": "rotary"}, "model.posenc.kind",
     "valid: alibi, clex, fire, kerple_log, kerple_power, learned, nope, rope, sinusoidal, t5, "
     "xpos"),
    ({"model.attention.impl": "flash"}, "model.attention.impl", "valid: auto, blockwise"),
    ({"model.dtype": "float16"}, "model.dtype", "valid: bfloat16, float32"),
    ({"model.remat": "some"}, "model.remat", "valid: dots, dots_no_batch, full, none"),
    ({"model.num_heads": 3}, "model.num_heads", "must divide model.width=64"),
    ({"model.num_kv_heads": 3, "model.num_heads": 4}, "model.num_kv_heads", "must divide"),
    ({"model.num_layers": 3, "model.mixers": "attn,attn"}, "model.num_layers", "multiple of"),
    ({"model.mlp_hidden": -1}, "model.mlp_hidden", "must be >= 0 (0 = no MLP"),
    ({"model.mixers": "attention(windw=4),attention"}, "model.mixers",
     "attention has no field 'windw' (valid: block_size, distance_ceiling, impl"),
    ({"model.mixers": "attention(window=four),attention"}, "model.mixers",
     "'four' is not a int"),
    ({"model.mixers": "attention(window=-2),attention"}, "model.mixers[0]:attention.window",
     "must be >= 0"),
    ({"model.mixers": "attention,attention(sink_tokens=2)"},
     "model.mixers[1]:attention.sink_tokens", "> 0 only with model.mixers[1]:attention.window"),
    ({"train.steps": 0}, "train.steps", "must be positive"),
    ({"train.batch_size": -4}, "train.batch_size", "must be positive"),
    ({"train.learning_rate": 0.0}, "train.learning_rate", "must be positive"),
    ({"data.seq_len": 0}, "data.seq_len", "must be positive"),
    ({"data.tokenizer": "bpe"}, "data.tokenizer", "valid: byte, sentencepiece"),
    ({"data.source_dir": "/no/such/dir"}, "data.source_dir", "is not a directory"),
    ({"eval.lengths": "1x,abc"}, "eval.lengths", "cannot parse 'abc'"),
    ({"eval.lengths": "0"}, "eval.lengths", "not positive"),
    ({"model.posenc.kind": "learned", "model.posenc.max_length": 16}, "model.posenc.max_length",
     "must cover data.seq_len=32"),
    ({"model.posenc.train_positions": "randomized", "model.posenc.scaling": "dynamic_ntk",
      "model.posenc.original_length": 32}, "model.posenc.train_positions",
     "cannot be combined with model.posenc.scaling='dynamic_ntk'"),
    ({"model.posenc.kind": "clex"}, "model.posenc.train_positions",
     "CLEX trains with, and only with, train_positions='clex'"),
    ({"model.posenc.train_positions": "clex"}, "model.posenc.train_positions",
     "(model.posenc.kind='rope')"),
    ({"model.posenc.kind": "clex", "model.posenc.train_positions": "clex",
      "model.posenc.clex_max_factor": 0}, "model.posenc.clex_max_factor", "integer >= 1"),
    ({"model.posenc.kind": "clex", "model.posenc.train_positions": "clex",
      "model.posenc.original_length": 64}, "model.posenc.original_length",
     "relative to the training length data.seq_len=32"),
    ({"model.posenc.kind": "xpos", "model.posenc.xpos_gamma": 0.0}, "model.posenc.xpos_gamma",
     "must be positive"),
    ({"model.posenc.kind": "xpos", "model.posenc.xpos_scale_base": 1.0},
     "model.posenc.xpos_scale_base",
     "overflow float32 beyond position 63, below the evaluation length 128"),
    ({"model.attention.window": 8, "model.attention.sink_tokens": 2,
      "model.attention.distance_ceiling": 8, "model.posenc.scaling": "dynamic_ntk",
      "model.posenc.original_length": 32}, "model.attention.distance_ceiling",
     "depend on the context length"),
    ({"model.attention.normalizer": "sigmoid"}, "model.attention.normalizer",
     "unknown choice (valid: softmax, softplus)"),
    ({"model.attention.normalizer": "softplus", "model.attention.reweight_power": 0.5},
     "model.attention.reweight_power", "must be 0 (off) or >= 1"),
    ({"model.attention.reweight_power": 15.0}, "model.attention.reweight_power",
     "re-weights softplus attention, but model.attention.normalizer='softmax'"),
    ({"model.attention.normalizer": "softplus", "model.attention.window": 8,
      "model.attention.sink_tokens": 2}, "model.attention.sink_tokens", "softmax-only"),
    ({"model.attention.normalizer": "softplus", "model.attention.window": 8,
      "model.attention.sink_tokens": 2, "model.attention.distance_ceiling": 8},
     "model.attention.distance_ceiling", "softmax-only"),
    ({"model.attention.normalizer": "softplus", "model.attention.log_scaling_length": 32},
     "model.attention.log_scaling_length", "scales the logits by log(N) itself"),
    ({"model.attention.learned_sink": True, "model.attention.normalizer": "softplus"},
     "model.attention.learned_sink", "needs softmax attention"),
    ({"model.attention.impl": "cpu", "model.attention.normalizer": "softplus"},
     "model.attention.impl", "has no softplus kernel"),
    ({"model.attention.impl": "cpu", "model.posenc.kind": "t5"}, "model.attention.impl",
     "computes no position bias but ALiBi (model.posenc.kind='t5')"),
    ({"model.attention.impl": "splash", "model.attention.normalizer": "softplus"},
     "model.attention.impl", "has no softplus kernel"),
    ({"model.attention.impl": "cudnn", "model.posenc.kind": "alibi"}, "model.attention.impl",
     "takes no position bias (model.posenc.kind='alibi')"),
    ({"model.scan_layers": False, "model.remat": "full"}, "model.scan_layers",
     "model.remat='full' needs the layer scan"),
    ({"mesh.data": 4}, "mesh", "needs 4 devices but only 1 exist"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, "mesh", "at most one axis may be -1"),
    ({"mesh.rules": "batch:pipeline"}, "mesh.rules", "unknown mesh axis 'pipeline'"),
]


class ValidateTest(parameterized.TestCase):

  def test_default_configs_are_valid(self):
    configuration.validate(testing.tiny_config(), num_devices=1)
    from configs import quickstart  # pylint: disable=g-import-not-at-top
    configuration.validate(quickstart.get_config(), num_devices=1)

  @parameterized.parameters(*BAD_VALUES)
  def test_bad_value_names_field_value_and_choices(self, overrides, field, fragment):
    with self.assertRaises(configuration.ConfigError) as ctx:
      configuration.validate(testing.tiny_config(**overrides), num_devices=1)
    message = str(ctx.exception)
    self.assertTrue(message.startswith(field), message)
    self.assertIn(fragment, message)
    self.assertNotIn("\n", message)

  def test_batch_not_divisible_by_data_parallel_devices(self):
    config = testing.tiny_config(**{"train.batch_size": 6})
    with self.assertRaisesRegex(configuration.ConfigError,
                                r"^train.batch_size=6: must be divisible by the 4 data-parallel"):
      configuration.validate(config, num_devices=4)
    configuration.validate(testing.tiny_config(**{"train.batch_size": 8}), num_devices=4)

  def test_eval_lengths_parse(self):
    self.assertEqual(configuration.parse_eval_lengths("4x, 1x,100,2x", 32), [32, 64, 100, 128])

  def test_json_round_trip(self):
    config = testing.tiny_config()
    again = configuration.from_json(configuration.to_json(config))
    self.assertEqual(again.to_dict(), config.to_dict())


class CommandLineErrorTest(absltest.TestCase):

  def test_one_line_error_and_nothing_written(self):
    workdir = os.path.join(self.create_tempdir().full_path, "run")
    proc = testing.run_module("experiments.train", "--config=configs/quickstart.py:tiny",
                              f"--workdir={workdir}", "--config.model.posenc.kind=rotary",
                              timeout=300)
    self.assertEqual(proc.returncode, 2)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    self.assertEqual(lines[-1], "error: config: model.posenc.kind='rotary': unknown choice (valid: "
                                + ", ".join(sorted(POSENCS)) + ")", proc.stderr)
    self.assertNotIn("Traceback", proc.stderr)
    self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
  absltest.main()
