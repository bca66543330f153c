"""`host_memory.reuse_freed_memory`: freed memory is reused without new page faults.

Runs in child processes (the setting is process-wide and permanent): each one mallocs 256 MiB,
writes it, frees it, mallocs and writes it again, and counts the minor page faults of the second
write (`testing.second_write_page_faults`: fresh pages fault; pages the process kept do not).
"""

import subprocess
import sys

from absl.testing import absltest

from longjax import host_memory
from tests import testing

_SECOND_WRITE_FAULTS = """
import sys
from longjax import host_memory
from tests import testing
if sys.argv[1] == "reuse":
  assert host_memory.reuse_freed_memory()
print(testing.second_write_page_faults(256))
"""


def _second_write_faults(mode: str) -> int:
  run = subprocess.run([sys.executable, "-c", _SECOND_WRITE_FAULTS, mode], capture_output=True,
                       text=True, check=True, cwd=testing.REPO_ROOT)
  return int(run.stdout.split()[-1])


class ReuseFreedMemoryTest(absltest.TestCase):

  def test_second_allocation_does_not_fault(self):
    if not host_memory.supported():
      self.skipTest("the setting is for glibc; other C libraries keep their defaults")
    pages = 256 * 2**20 // 4096
    # By default glibc maps a 256 MiB request freshly each time (nearly a fault per 4 KiB page;
    # fewer with transparent huge pages); with the setting the second write faults almost never.
    self.assertGreater(_second_write_faults("default"), pages // 600)
    self.assertLess(_second_write_faults("reuse"), 64)


if __name__ == "__main__":
  absltest.main()
