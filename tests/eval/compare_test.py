"""Evaluation-time method comparison on one trained run; saved configs gain new fields."""

import json
import os

from absl.testing import absltest
from flax import nnx
import numpy as np

from experiments import report
from longjax import configuration
from longjax import experiment
from longjax import runs
from longjax.eval import compare
from tests import testing


class CompareTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = os.path.join(absltest.get_default_test_tmpdir(), "compare_run")
    config = testing.tiny_config(**{"train.steps": 10, "eval.lengths": "1x,4x"})
    experiment.train_and_evaluate(config, cls.workdir, progress=False)

  def test_none_and_log_n(self):
    run = runs.load_run(self.workdir)
    results = compare.compare(config=run.config, params=run.params, corpus=run.corpus,
                              workdir=self.workdir, methods=["none", "log_n"], progress=False)
    with open(os.path.join(self.workdir, "eval", "perplexity.json")) as f:
      trained = json.load(f)
    # "none" is the plain evaluation the trainer ran.
    np.testing.assert_allclose(results["none"]["loss"], trained["loss"], rtol=1e-6)
    # log-n scaling is the identity up to the training length and changes the loss beyond it.
    none_pos = np.asarray(results["none"]["per_position"]["128"])
    logn_pos = np.asarray(results["log_n"]["per_position"]["128"])
    np.testing.assert_allclose(logn_pos[:32], none_pos[:32], rtol=1e-5)
    self.assertGreater(np.abs(logn_pos[40:] - none_pos[40:]).max(), 1e-4)
    self.assertEqual(results["log_n"]["overrides"],
                     {"model.attention.log_scaling_length": 32})
    for name in ("compare_loss_vs_length.png", "compare_loss_vs_position.png"):
      self.assertTrue(os.path.exists(os.path.join(self.workdir, "plots", name)))
    # The README's table is printed by `experiments.report --compare` from compare.json.
    table = report.compare_markdown(self.workdir).splitlines()
    self.assertEqual(table[0], "| method | 32 | 128 |")
    self.assertEqual(table[3], "| `log_n` | " + " | ".join(
        f"{x:.3f}" for x in results["log_n"]["loss"]) + " |")

  def test_retrieval_policies(self):
    """The policies attend to everything within their window (L/2 = 16 tokens here): the same
    losses as the full model there, different ones beyond."""
    run = runs.load_run(self.workdir)
    results = compare.compare(config=run.config, params=run.params, corpus=run.corpus,
                              workdir=self.workdir,
                              methods=["none", "infllm", "tokenselect", "hip", "duo"],
                              progress=False)
    none_pos = np.asarray(results["none"]["per_position"]["128"])
    for method in ("infllm", "tokenselect", "hip", "duo"):
      pos = np.asarray(results[method]["per_position"]["128"])
      np.testing.assert_allclose(pos[:16], none_pos[:16], rtol=1e-4)
      self.assertGreater(np.abs(pos[16:] - none_pos[16:]).max(), 1e-4)
      self.assertTrue(np.all(np.isfinite(pos)))
    self.assertEqual(results["infllm"]["overrides"]["model.attention.retrieval_top_k"], 8)
    # DuoAttention's split was calibrated (half of 2 layers x 2 KV heads) and recorded.
    with open(os.path.join(self.workdir, "eval", "duo_heads.json")) as f:
      calibration = json.load(f)
    split = results["duo"]["overrides"]["model.attention.retrieval_head_split"]
    self.assertEqual(split, calibration["head_split"])
    self.assertEqual(sum(len(p.split(":")[1].split(",")) for p in split.split(";")
                         if p.split(":")[1]), 2)

  def test_loading_a_run_with_duo_calibrates_its_heads(self):
    """`experiments.evaluate --config.model.attention.retrieval=duo` (and sample) load the run
    through `runs.load_run`, which calibrates the split and builds the model with it."""
    config = runs.saved_config(self.workdir)
    with config.unlocked():
      config.update_from_flattened_dict({
          "model.attention.retrieval": "duo", "model.attention.retrieval_window": 16,
          "model.attention.retrieval_sinks": 2, "model.attention.retrieval_heads": 0.25})
    run = runs.load_run(self.workdir, config)
    split = run.config.model.attention.retrieval_head_split
    self.assertLen([h for p in split.split(";") for h in p.split(":")[1].split(",") if h], 1)
    model = nnx.merge(run.graphdef, run.params)
    caches = model.init_cache(1, 64)
    self.assertEqual(sorted(c.k.shape[2] for c in caches), [0, 1])

  def test_unknown_method(self):
    run = runs.load_run(self.workdir)
    with self.assertRaisesRegex(ValueError, "unknown evaluation method.*valid: .*log_n, none, ntk"):
      compare.compare(config=run.config, params=run.params, corpus=run.corpus,
                      workdir=self.workdir, methods=["none", "magic"], progress=False)

  def test_saved_config_gains_new_fields(self):
    # A run saved before a field existed loads with that field's default.
    workdir = self.create_tempdir().full_path
    with open(os.path.join(self.workdir, "config.json")) as f:
      saved = json.load(f)
    del saved["model"]["attention"]["log_scaling_length"]
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(saved, f)
    config = runs.saved_config(workdir)
    self.assertEqual(config.model.attention.log_scaling_length, 0)
    self.assertEqual(config.data.seq_len, saved["data"]["seq_len"])



class MethodOverridesTest(absltest.TestCase):

  def test_reweight_needs_softplus_and_validates(self):
    config = testing.tiny_config(**{"model.attention.normalizer": "softplus"})
    overrides = compare.method_overrides("reweight", config, 128)
    self.assertEqual(overrides, {"model.attention.reweight_power": compare.REWEIGHT_POWER})
    configuration.validate_model(compare.apply_overrides(config, overrides).model)
    with self.assertRaisesRegex(configuration.ConfigError,
                                "^model.attention.normalizer='softmax': --compare=reweight"):
      compare.method_overrides("reweight", testing.tiny_config(), 128)

  def test_methods_need_an_attention_layer(self):
    retnet = testing.tiny_config(**{"model.mixers": "retnet"})
    self.assertEqual(compare.method_overrides("none", retnet, 128), {})
    for method in ("yarn", "window", "log_n"):
      with self.assertRaisesRegex(configuration.ConfigError,
                                  f"^--compare='{method}': changes softmax attention layers .* "
                                  "model.mixers='retnet' has none"):
        compare.method_overrides(method, retnet, 128)
    hybrid = testing.tiny_config(**{"model.mixers": "retnet,attention"})
    self.assertIn("model.attention.window", compare.method_overrides("window", hybrid, 128))


if __name__ == "__main__":
  absltest.main()
