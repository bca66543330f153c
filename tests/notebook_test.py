"""The colab notebooks run top to bottom on CPU (tiny configuration, smoke-size study).

The notebook runs in a child process: nbclient brings zmq, tornado and an event loop with their
own threads, which must not outlive this test inside a pytest worker that goes on to run
JAX tests (a worker that had run it crashed in a later test once).
"""

import json
import os
import subprocess

from absl.testing import absltest
import nbformat

from configs import studies
from longjax.studies import runner
from tests import testing
from tests.studies import study_test

# Executes the notebook given as argv[1] and writes the executed copy to argv[2].
_RUNNER = """
import sys
import nbclient, nbformat
nb = nbformat.read(sys.argv[1], as_version=4)
nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                        resources={"metadata": {"path": sys.argv[3]}}).execute()
nbformat.write(nb, sys.argv[2])
"""


class NotebookTest(absltest.TestCase):

  def _run(self, name: str, workdir: str, **env_vars) -> str:
    """Executes colab/NAME.ipynb; returns the text its code cells printed."""
    executed = os.path.join(workdir, "executed.ipynb")
    env = testing.python_env()  # the kernel inherits the runner's environment
    env["LONGJAX_NOTEBOOK_WORKDIR"] = os.path.join(workdir, "run")
    env["LONGJAX_NOTEBOOK_TINY"] = "1"
    env.update(env_vars)
    done = subprocess.run(
        [testing.PYTHON, "-c", _RUNNER,
         os.path.join(testing.REPO_ROOT, "colab", f"{name}.ipynb"), executed,
         testing.REPO_ROOT],
        env=env, capture_output=True, text=True, timeout=900)
    self.assertEqual(done.returncode, 0, done.stderr[-4000:])
    nb = nbformat.read(executed, as_version=4)
    return "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for o in cell.get("outputs", []))

  def test_studies_notebook_runs_a_study_that_then_resumes(self):
    workdir = self.create_tempdir().full_path
    outputs = self._run("studies", workdir, LONGJAX_NOTEBOOK_STUDY=study_test.NOTEBOOK_STUDY)
    self.assertIn("size=smoke", outputs)
    self.assertRegex(outputs, r"(PASS|FAIL)  NoPE's mean reciprocal rank")
    # The notebook's smoke run is this study's smoke test: rerun here, nothing is retrained.
    run = os.path.join(workdir, "run")
    with open(os.path.join(run, "results.json"), encoding="utf-8") as f:
      saved = json.load(f)
    metrics = {v: os.path.getmtime(os.path.join(run, "variants", v, "metrics.jsonl"))
               for v in saved["variants"]}
    again = runner.run_study(studies.load(study_test.NOTEBOOK_STUDY), run, size="smoke",
                             progress=False, log=lambda line: None)
    self.assertEqual(json.loads(json.dumps(again["summary"])), saved["summary"])
    self.assertEqual(metrics, {v: os.path.getmtime(os.path.join(run, "variants", v,
                                                                "metrics.jsonl"))
                               for v in saved["variants"]})
    self.assertTrue(os.path.exists(os.path.join(run, "report.md")))

  def test_quickstart_notebook_runs(self):
    workdir = self.create_tempdir().full_path
    outputs = self._run("quickstart", workdir)
    self.assertIn("validation loss", outputs)
    self.assertIn("unigram baseline", outputs)
    self.assertTrue(os.path.exists(os.path.join(workdir, "run", "eval",
                                                "perplexity-longer.json")))


if __name__ == "__main__":
  absltest.main()
