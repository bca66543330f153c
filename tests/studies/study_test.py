"""The study machinery: PASS/FAIL logic on synthetic result tables, the runner's refusals, and
every study of configs/studies at smoke size (train, evaluate, report, publish)."""

import dataclasses
import json
import os

from absl.testing import absltest
from absl.testing import parameterized

from configs import studies
from longjax.studies import Criterion, check_criteria, docs, runner
from longjax.studies.study import mean_reciprocal_rank
from tests import testing

NOTEBOOK_STUDY = "nope_reasoning"


def _nope_summary(beyond: dict[str, float]) -> dict:
  """A nope_reasoning summary with one task and these accuracies beyond the training length."""
  per_task = {pe: {"copy": v} for pe, v in beyond.items()}
  return {"tasks": ["copy"], "beyond": per_task, "mean_beyond": dict(beyond),
          "mrr": mean_reciprocal_rank(per_task)}


class CriteriaTest(absltest.TestCase):

  def test_mean_reciprocal_rank_closed_form(self):
    scores = {"a": {"x": 0.9, "y": 0.1}, "b": {"x": 0.5, "y": 0.5}, "c": {"x": 0.5, "y": 0.0}}
    mrr = mean_reciprocal_rank(scores)
    # x: a first, b and c tied second; y: b first, a second, c third.
    self.assertAlmostEqual(mrr["a"], (1 + 1 / 2) / 2)
    self.assertAlmostEqual(mrr["b"], (1 / 2 + 1) / 2)
    self.assertAlmostEqual(mrr["c"], (1 / 2 + 1 / 3) / 2)

  def test_a_table_that_should_fail_fails(self):
    criteria = studies.load("nope_reasoning").criteria
    good = _nope_summary({"nope": 0.6, "t5": 0.5, "alibi": 0.1, "rope": 0.0, "sinusoidal": 0.0})
    self.assertEqual([c["passed"] for c in check_criteria(criteria, good)], [True, True])
    rope_best = _nope_summary({"nope": 0.2, "t5": 0.1, "alibi": 0.1, "rope": 0.5,
                               "sinusoidal": 0.0})
    self.assertEqual([c["passed"] for c in check_criteria(criteria, rope_best)], [False, False])
    # Everything at zero: nobody outperforms anybody.
    zeros = _nope_summary(dict.fromkeys(("nope", "t5", "alibi", "rope", "sinusoidal"), 0.0))
    self.assertEqual([c["passed"] for c in check_criteria(criteria, zeros)], [False, False])
    # T5 carries criterion 2 when NoPE does not.
    t5_best = _nope_summary({"nope": 0.1, "t5": 0.5, "alibi": 0.2, "rope": 0.2,
                             "sinusoidal": 0.2})
    self.assertEqual([c["passed"] for c in check_criteria(criteria, t5_best)], [False, True])

  def test_landmark_passkey_verdicts(self):
    study = studies.load("landmark_passkey")

    def summary(landmark_rows, dense_rows, infllm_rows):
      grid = lambda rows: {"passkey": {"lengths": [256, 512, 1024, 2048], "depths": [0, 1],
                                       "accuracy": rows, "train_length": 256}}
      return study.summarize({"dense": grid(dense_rows), "landmark": grid(landmark_rows),
                              "infllm": grid(infllm_rows)})
    good = summary([[1, 1], [1, 1], [1, 0.9], [0.9, 0.95]], [[1, 1], [0, 0], [0, 0], [0, 0]],
                   [[1, 1], [1, 1], [1, 1], [1, 0.8]])
    self.assertEqual([c["passed"] for c in check_criteria(study.criteria, good)],
                     [True, True, True])
    bad = summary([[1, 1], [0, 0], [0, 0], [0.9, 0.8]], [[1, 1], [1, 1], [0, 0], [0, 0]],
                  [[1, 1], [1, 1], [1, 1], [0.9, 0.8]])
    self.assertEqual([c["passed"] for c in check_criteria(study.criteria, bad)],
                     [False, False, False])

  def test_train_short_test_long_verdicts(self):
    study = studies.load("train_short_test_long")
    lengths = [64, 128, 256, 512, 1024]

    def summary(**losses):
      results = {name: {"perplexity": {"lengths": lengths, "loss": loss, "train_length": 64}}
                 for name, loss in losses.items()}
      return study.summarize(results)
    base = dict(rope=[2.0, 2.5, 3, 3, 3], sinusoidal=[2.0, 2.6, 4, 5, 6],
                sinusoidal_2L=[2.0, 1.9, 3, 3, 3], alibi=[2.0, 1.905, 1.9, 1.9, 1.95],
                kerple_log=[2.0, 1.9, 1.8, 1.8, 1.8], fire=[2.0, 1.8, 1.7, 1.7, 1.7])
    self.assertEqual([c["passed"] for c in check_criteria(study.criteria, summary(**base))],
                     [True, True, True, True, True])
    worse = dict(base, rope=[2.0, 1.9, 1.8, 1.8, 1.8], alibi=[2.0, 1.95, 1.9, 1.9, 2.1],
                 kerple_log=[2.0, 1.94, 1.95, 1.8, 1.8], fire=[2.0, 2.0, 2.0, 2.0, 2.0])
    self.assertEqual([c["passed"] for c in check_criteria(study.criteria, summary(**worse))],
                     [False, False, False, False, False])

  def test_a_criterion_that_cannot_be_computed_fails(self):
    broken = Criterion(quote="q", test="t", check=lambda s: (s["missing"] > 0, 1.0))
    [verdict] = check_criteria((broken,), {})
    self.assertFalse(verdict["passed"])
    self.assertIn("KeyError", verdict["measured"])


class RunnerTest(absltest.TestCase):

  def test_refusals_write_nothing(self):
    study = studies.load("nope_reasoning")
    workdir = os.path.join(self.create_tempdir().full_path, "w")
    with self.assertRaisesRegex(runner.StudyError, "unknown size 'huge'; valid: smoke, cpu"):
      runner.run_study(study, workdir, size="huge")
    with self.assertRaisesRegex(runner.StudyError, "no variant 'x'; valid: copy_nope"):
      runner.run_study(study, workdir, size="smoke", only=["x"])
    self.assertFalse(os.path.exists(workdir))
    with self.assertRaisesRegex(ValueError, "unknown study 'x'; valid: .*nope_reasoning"):
      studies.load("x")

  def test_evaluation_only_variants_take_their_base_config(self):
    study = studies.load("landmark_passkey")
    configs = runner.variant_configs(study, "cpu")
    config, base = configs["infllm"]
    self.assertEqual(base, "dense")
    self.assertEqual(config.model.attention.retrieval, "infllm")
    self.assertEqual(config.model.mixers, configs["dense"][0].model.mixers)
    # Asking for an evaluation-only variant alone brings its base along.
    self.assertEqual(list(runner.variant_configs(study, "cpu", only=["hip"])), ["dense", "hip"])
    broken = dataclasses.replace(study, variants=lambda size: {"a": {"eval_of": "b"}})
    with self.assertRaisesRegex(runner.StudyError, "variant a: eval_of='b' is not a trained"):
      runner.variant_configs(broken, "cpu")


def _smoke_config(study):
  """The smoke config on the test corpus (text studies) and the test's dataset cache."""
  def config(size):
    c = study.config(size)
    tiny = testing.tiny_config()
    c.data.source_dir, c.data.tfds_dir = tiny.data.source_dir, tiny.data.tfds_dir
    c.data.validation_percent = tiny.data.validation_percent
    return c
  return config


class SmokeTest(parameterized.TestCase):

  # tests/notebook_test.py runs NOTEBOOK_STUDY's smoke through colab/studies.ipynb and checks
  # the runner's resume on it; every other study runs here, once.
  @parameterized.parameters(*(n for n in studies.names() if n != NOTEBOOK_STUDY))
  def test_runs_and_reports(self, name):
    study = studies.load(name)
    study = dataclasses.replace(study, config=_smoke_config(study))
    workdir = self.create_tempdir().full_path
    lines = []
    document = runner.run_study(study, workdir, size="smoke", progress=False, log=lines.append)
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
      saved = json.load(f)
    self.assertEqual(saved["summary"], json.loads(json.dumps(document["summary"])))
    self.assertLen(saved["criteria"], len(study.criteria))
    self.assertLen(lines, len(saved["variants"]))  # one progress line per variant
    with open(os.path.join(workdir, "report.md"), encoding="utf-8") as f:
      report = f.read()
    self.assertIn("## Claims:", report)
    for plot in saved["plots"]:
      self.assertTrue(os.path.exists(os.path.join(workdir, plot)), plot)
    # Published into a docs file twice: one section, the same text, plots copied.
    docs_path = os.path.join(self.create_tempdir().full_path, "studies.md")
    with open(docs_path, "w", encoding="utf-8") as f:
      f.write("# Studies\n\nintro\n")
    first = docs.publish(workdir, docs_path, study.table)
    docs.publish(workdir, docs_path, study.table)
    with open(docs_path, encoding="utf-8") as f:
      text = f.read()
    self.assertEqual(docs.sections_of(text), {name: first})
    self.assertTrue(text.startswith("# Studies\n\nintro\n"))
    for plot in saved["plots"]:
      self.assertTrue(os.path.exists(os.path.join(os.path.dirname(docs_path), "images",
                                                  "studies", name, os.path.basename(plot))))


class PublishedDocsTest(absltest.TestCase):

  def test_every_study_section_is_generated_from_its_results(self):
    docs_dir = os.path.join(testing.REPO_ROOT, "docs")
    with open(os.path.join(docs_dir, "studies.md"), encoding="utf-8") as f:
      sections = docs.sections_of(f.read())
    self.assertEqual(set(sections), set(studies.names()))  # every study is published
    for name, text in sections.items():
      with open(os.path.join(docs_dir, "studies", f"{name}.json"), encoding="utf-8") as f:
        document = json.load(f)
      table = studies.load(name).table(document["summary"])
      self.assertEqual(text, docs.section(document, table, f"images/studies/{name}"), name)
      for plot in document["plots"]:
        self.assertTrue(os.path.exists(os.path.join(docs_dir, "images", "studies", name,
                                                    os.path.basename(plot))), plot)


if __name__ == "__main__":
  absltest.main()
