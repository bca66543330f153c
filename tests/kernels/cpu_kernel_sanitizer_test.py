"""The CPU flash attention kernel under AddressSanitizer, UBSan and ThreadSanitizer.

Numerical tests cannot see a read past the end of a buffer whose garbage is masked away
afterwards, nor a task that races with another; such bugs crash only now and then (one did: keys
of length 1 read as 16). Here the kernel's forward and backward drivers run over random shapes,
masks and biases, on a std::thread pool, in a harness built with the sanitizers, which abort on
the first bad access or data race.
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

  def _build_and_run(self, sanitizer_flags, runtime, iterations, env, opt="-O1"):
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
      self.skipTest("no C++ compiler on PATH (the CPU kernels are not built either)")
    binary = os.path.join(self.create_tempdir().full_path, "harness")
    build = subprocess.run(
        [compiler, opt, "-g", *sanitizer_flags, "-fno-omit-frame-pointer", "-march=native",
         "-std=c++17", "-w", "-pthread", f"-I{jax.ffi.include_dir()}", f"-I{KERNELS}", HARNESS,
         "-o", binary],
        capture_output=True, text=True)
    if build.returncode != 0 and runtime in build.stderr.lower():
      self.skipTest(f"the compiler has no {runtime} runtime: {build.stderr[-300:]}")
    self.assertEqual(build.returncode, 0, build.stderr[-3000:])
    run = subprocess.run([binary, str(iterations), "1"], capture_output=True, text=True,
                         timeout=600, env={**os.environ, **env})
    if "unexpected memory mapping" in run.stderr:
      # ThreadSanitizer cannot run under some kernels' address-space randomisation settings.
      self.skipTest(f"{runtime} cannot map its shadow memory here: {run.stderr[-300:]}")
    self.assertEqual((run.returncode, run.stdout.strip()), (0, "ok"), run.stderr[-4000:])

  # Iterations: a harness built with --coverage (seed 1) reaches the same lines and branches of
  # every kernel header (forward, backward, decode, blocks, mask, selective scan, gemm, simd,
  # thread pool) after 50 iterations as after 400; the counts below keep a margin of 3x (ASan)
  # and 2x (TSan) over that. ASan's run was 16 s at 400 iterations, TSan's 10.5 s at 200.

  def test_no_out_of_bounds_access(self):
    # -O0: every load and store stays in the code for ASan to check, and the build takes 7 s
    # instead of 23 (the run 9 s instead of 4). ThreadSanitizer's run is the slow part: -O1.
    self._build_and_run(["-fsanitize=address,undefined", "-fno-sanitize-recover=all"], "asan",
                        150, {"ASAN_OPTIONS": "detect_leaks=0"}, opt="-O0")

  def test_no_data_race(self):
    # Checked by breaking ParallelFor's final wait: this test then fails with a race report.
    self._build_and_run(["-fsanitize=thread"], "tsan", 100,
                        {"TSAN_OPTIONS": "halt_on_error=1"})


if __name__ == "__main__":
  absltest.main()
