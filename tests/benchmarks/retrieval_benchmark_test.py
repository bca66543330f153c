"""The retrieval suite: one case runs in-process from a filled cache, and the ratios and the
issue's targets follow from the numbers (synthetic results)."""

from absl.testing import absltest
from absl.testing import parameterized

from longjax.benchmarks import retrieval


def _row(impl, t, ms):
  return {"impl": impl, "t": t, "width": 512, "layers": 8, "status": "ok",
          "decode_ms_per_token": ms, "cache_bytes": 2**20}


class RetrievalSuiteTest(parameterized.TestCase):

  @parameterized.parameters("landmark", "infllm", "infllm_host", "duo")
  def test_one_case_in_process(self, impl):
    result = retrieval.retrieval_case(impl, 64, 1, 2200, 1, repeats=1, budget_s=5,
                                      memory_budget=None)
    self.assertGreater(result["decode_ms_per_token"], 0)
    self.assertGreater(result["cache_bytes"], 0)
    # Offloaded: the keys and values (2 x 2304 slots x 1 head x 64 x 4 bytes) leave the device.
    offloaded = 2 * 2304 * 64 * 4 if impl == "infllm_host" else 0
    self.assertEqual(result["device_cache_bytes"], result["cache_bytes"] - offloaded)

  def test_ratios_and_targets(self):
    results = [_row("attention", 4096, 10.0), _row("landmark", 4096, 4.0),
               _row("attention", 65536, 100.0), _row("landmark", 65536, 8.0)]
    summary = retrieval.derive(results)
    self.assertAlmostEqual(results[3]["speedup_vs_full"], 12.5)
    self.assertAlmostEqual(results[3]["vs_shortest"], 2.0)
    flat, fast = summary["targets"]
    self.assertFalse(flat["met"])  # 2x > 1.5x
    self.assertTrue(fast["met"])
    self.assertIn("12.5x", fast["measured"])
    self.assertIn("| **no** |", retrieval.markdown(results, summary))

  def test_targets_not_measured_at_small_sizes(self):
    summary = retrieval.derive([_row("attention", 512, 1.0), _row("landmark", 512, 2.0)])
    self.assertEqual([t["met"] for t in summary["targets"]], [None, None])


if __name__ == "__main__":
  absltest.main()
