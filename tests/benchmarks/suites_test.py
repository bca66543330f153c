"""An interrupted suite resumes where it stopped: finished cases are kept beside OUT and a rerun
of the same command reuses them; another command starts afresh."""

import os
from unittest import mock

from absl.testing import absltest

from longjax.benchmarks import processes
from longjax.benchmarks import suites


def _cases(n):
  return [{"function": "f", "labels": {"i": i}, "kwargs": {"i": i}} for i in range(n)]


class ResumeTest(absltest.TestCase):

  def test_rerun_reuses_finished_cases(self):
    out = os.path.join(self.create_tempdir().full_path, "x.json")
    calls = []

    def fake_run_case(module, function, kwargs, **unused):
      calls.append(kwargs["i"])
      if kwargs["i"] == 2 and len(calls) == 3:
        raise KeyboardInterrupt  # the first run is stopped during its third case
      return {"status": "ok", "value": 10 * kwargs["i"]}

    identity = {"suite": "s", "sizes": "tiny", "argv": []}
    with mock.patch.object(processes, "run_case", fake_run_case):
      with self.assertRaises(KeyboardInterrupt):
        with suites.resumable(out, identity):
          suites.run_cases("m", _cases(4), desc="t", timeout_s=1)
      self.assertEqual(calls, [0, 1, 2])
      with suites.resumable(out, identity) as reused:
        results = suites.run_cases("m", _cases(4), desc="t", timeout_s=1)
      self.assertEqual(calls, [0, 1, 2, 2, 3])  # only the unfinished cases ran again
      self.assertEqual(reused[0], 2)
      self.assertEqual([r["value"] for r in results], [0, 10, 20, 30])
      # Another command (other sizes) does not reuse them.
      with suites.resumable(out, {**identity, "sizes": "full"}) as reused:
        suites.run_cases("m", _cases(2), desc="t", timeout_s=1)
      self.assertEqual((calls[-2:], reused[0]), ([0, 1], 0))


if __name__ == "__main__":
  absltest.main()
