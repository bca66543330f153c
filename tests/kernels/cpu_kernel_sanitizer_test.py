"""The CPU flash attention kernel under AddressSanitizer and UndefinedBehaviorSanitizer.

Numerical tests cannot see a read past the end of a buffer whose garbage is masked away
afterwards; such a read crashes only now and then (one did: keys of length 1 read as 16). Here
the kernel's forward and backward blocks run over random shapes, masks and biases in a harness
built with the sanitizers, which abort on the first bad access.
"""

import os
import shutil
import subprocess

from absl.testing import absltest
import jax

from tests import testing

HARNESS = os.path.join(testing.REPO_ROOT, "tests", "kernels", "cpu_kernel_sanitizer_harness.cc")
KERNELS = os.path.join(testing.REPO_ROOT, "kernels_cpu")


class CpuKernelSanitizerTest(absltest.TestCase):

  def test_no_out_of_bounds_access(self):
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
      self.skipTest("no C++ compiler on PATH (the CPU kernels are not built either)")
    binary = os.path.join(self.create_tempdir().full_path, "harness")
    build = subprocess.run(
        [compiler, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
         "-fno-omit-frame-pointer", "-march=native", "-std=c++17", "-w",
         f"-I{jax.ffi.include_dir()}", f"-I{KERNELS}", HARNESS, "-o", binary],
        capture_output=True, text=True)
    if build.returncode != 0 and "asan" in build.stderr.lower():
      self.skipTest(f"the compiler has no sanitizer runtime: {build.stderr[-300:]}")
    self.assertEqual(build.returncode, 0, build.stderr[-3000:])
    run = subprocess.run([binary, "400", "1"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "ASAN_OPTIONS": "detect_leaks=0"})
    self.assertEqual((run.returncode, run.stdout.strip()), (0, "ok"), run.stderr[-4000:])


if __name__ == "__main__":
  absltest.main()
