"""colab/quickstart.ipynb runs top to bottom on CPU (tiny configuration)."""

import os

from absl.testing import absltest
import nbclient
import nbformat

from tests import testing


class NotebookTest(absltest.TestCase):

  def test_quickstart_notebook_runs(self):
    workdir = self.create_tempdir().full_path
    saved = dict(os.environ)
    # The kernel inherits this process's environment.
    os.environ["LONGJAX_NOTEBOOK_WORKDIR"] = os.path.join(workdir, "run")
    os.environ["LONGJAX_NOTEBOOK_TINY"] = "1"
    os.environ["PYTHONPATH"] = testing.python_env()["PYTHONPATH"]
    try:
      nb = nbformat.read(os.path.join(testing.REPO_ROOT, "colab", "quickstart.ipynb"),
                         as_version=4)
      nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                              resources={"metadata": {"path": testing.REPO_ROOT}}).execute()
    finally:
      os.environ.clear()
      os.environ.update(saved)
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                      for o in cell.get("outputs", []))
    self.assertIn("validation loss", outputs)
    self.assertIn("unigram baseline", outputs)
    self.assertTrue(os.path.exists(os.path.join(workdir, "run", "eval",
                                                "perplexity-longer.json")))


if __name__ == "__main__":
  absltest.main()
