"""A train step sharded over 8 fake CPU devices equals the same step on 1 device."""

import json
import subprocess

from absl.testing import absltest
import numpy as np

from tests import testing

# Sharded reductions add in a different order than one device: float32 round-off only.
LOSS_RTOL = 1e-5
# Adam divides by sqrt(v): for an element whose gradient is ~0, round-off in the gradient
# becomes a visible part of its update (at most a fraction of the learning rate, 3e-3 here).
# So nearly all elements must agree to round-off, and every element to a small part of lr.
PARAM_ATOL_MOST = 2e-5
PARAM_FRACTION_MOST = 0.999
PARAM_ATOL_ALL = 2e-4


class ShardedStepTest(absltest.TestCase):

  def test_sharded_equals_single_device(self):
    proc = subprocess.run([testing.PYTHON, "-m", "tests.parallel.sharded_step_worker"],
                          cwd=testing.REPO_ROOT, env=testing.python_env(), capture_output=True,
                          text=True, timeout=600, check=False)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    results = json.loads(proc.stdout)
    reference = results.pop("one_device")
    self.assertEqual(reference["num_devices"], 1)
    for name, result in results.items():
      self.assertEqual(result["num_devices"], 8, name)
      np.testing.assert_allclose(result["losses"], reference["losses"], rtol=LOSS_RTOL,
                                 err_msg=name)
      self.assertEqual(result["params"].keys(), reference["params"].keys())
      for key, value in reference["params"].items():
        diff = np.abs(np.asarray(result["params"][key]) - np.asarray(value))
        self.assertLessEqual(diff.max(), PARAM_ATOL_ALL, f"{name}: {key}")
        self.assertGreaterEqual(np.mean(diff <= PARAM_ATOL_MOST), PARAM_FRACTION_MOST,
                                f"{name}: {key}")
    # The fsdp/tensor mesh really shards parameters (it is not replicating everything).
    self.assertGreater(results["data2_fsdp2_tensor2"]["num_sharded"], 5)
    self.assertEqual(results["data8"]["num_sharded"], 0)
    # Training moved the parameters: equality is not trivially the initial values.
    self.assertGreater(reference["losses"][0] - reference["losses"][-1], 0.0)


if __name__ == "__main__":
  absltest.main()
