"""A train step sharded over 8 fake CPU devices equals the same step on 1 device."""

import json
import subprocess

from absl.testing import absltest
import numpy as np

from tests import testing

# Sharded reductions add in a different order than one device: float32 round-off only.
LOSS_RTOL = 1e-5
PARAM_ATOL = 2e-5


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
        np.testing.assert_allclose(result["params"][key], value, atol=PARAM_ATOL, rtol=0,
                                   err_msg=f"{name}: {key}")
    # The fsdp/tensor mesh really shards parameters (it is not replicating everything).
    self.assertGreater(results["data2_fsdp2_tensor2"]["num_sharded"], 5)
    self.assertEqual(results["data8"]["num_sharded"], 0)
    # Training moved the parameters: equality is not trivially the initial values.
    self.assertGreater(reference["losses"][0] - reference["losses"][-1], 0.0)


if __name__ == "__main__":
  absltest.main()
