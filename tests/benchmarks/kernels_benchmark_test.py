"""The benchmark CLI end to end at tiny sizes, its child-process plumbing, and the FLOP counts."""

import itertools
import json
import math
import os
import signal
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

from longjax import host_memory
from longjax.benchmarks import peers
from longjax.benchmarks import processes
from longjax.benchmarks import flops
from longjax.benchmarks import kernels
from tests import testing

_THIS = "tests.benchmarks.kernels_benchmark_test"


def _run_cli(*args, timeout=600):
  # A process of its own forked from the per-worker entry point server (no ~3 s of imports per
  # run); the suite's cases still run in children started from scratch, as in a real run.
  return testing.run_module("experiments.benchmark", *args, timeout=timeout)


def _torch_installed() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec("torch") is not None


# Functions the child-process tests run (the child imports this module by name).
def _allocate(mib: int) -> dict:
  block = bytearray(mib * 2**20)
  for i in range(0, len(block), 4096):  # touch every page so it is resident
    block[i] = 1
  return {"allocated_mib": mib}


def _refault_mib(mib: int) -> dict:
  return {"refaults": testing.second_write_page_faults(mib)}


def _raise_memory_error() -> dict:
  raise MemoryError("no room")


def _sleep(seconds: float) -> dict:
  time.sleep(seconds)
  return {}


def _kill_self() -> dict:
  os.kill(os.getpid(), signal.SIGKILL)
  return {}


def _raise_skip() -> dict:
  raise processes.Skip("not here")


class FlopsTest(parameterized.TestCase):

  @staticmethod
  def _brute_force_multiply_adds(t, s, heads, head_dim, causal, backward):
    """Counts the multiply-adds of the attention matmuls one product at a time."""
    offset = s - t  # bottom-right aligned: query i sits at position i + S - T

    def visible(i, j):
      return not causal or j <= i + offset

    count = 0
    matmuls = 2 + (5 if backward else 0)
    for _, i, j in itertools.product(range(heads), range(t), range(s)):
      if visible(i, j):
        for _ in range(matmuls):  # each matmul touches pair (i, j) once per feature
          for _ in range(head_dim):
            count += 1
    return count

  @parameterized.product(causal=[True, False], backward=[True, False],
                         shape=[(4, 4, 1, 2), (4, 4, 2, 3), (1, 4, 2, 2), (3, 5, 1, 2),
                                (5, 3, 2, 2)])
  def test_attention_flops_match_brute_force(self, causal, backward, shape):
    t, s, heads, head_dim = shape
    expected = 2 * self._brute_force_multiply_adds(t, s, heads, head_dim, causal, backward)
    self.assertEqual(flops.attention_flops(t, s, heads, head_dim, causal=causal,
                                           backward=backward), expected)

  def test_hand_count_t4_h2_n1(self):
    # Causal T=S=4: 1+2+3+4 = 10 visible pairs; forward = 2 matmuls x 10 pairs x H=2 = 40
    # multiply-adds = 80 FLOPs; forward+backward = 7 matmuls -> 280 FLOPs.
    self.assertEqual(flops.visible_pairs(4, 4, causal=True), 10)
    self.assertEqual(flops.attention_flops(4, 4, 1, 2, causal=True, backward=False), 80)
    self.assertEqual(flops.attention_flops(4, 4, 1, 2, causal=True, backward=True), 280)
    self.assertEqual(flops.attention_flops(4, 4, 1, 2, causal=False, backward=False), 128)

  def test_backward_is_two_and_a_half_forwards(self):
    fwd = flops.attention_flops(1024, 1024, 8, 64, causal=True, backward=False)
    total = flops.attention_flops(1024, 1024, 8, 64, causal=True, backward=True, batch=1)
    self.assertEqual(total, 3.5 * fwd)
    # Causal is half of full up to the diagonal: T (T + 1) / 2 pairs.
    full = flops.attention_flops(1024, 1024, 8, 64, causal=False, backward=False)
    self.assertAlmostEqual(fwd / full, (1024 + 1) / (2 * 1024))

  def test_visible_pairs_closed_form(self):
    for t, s in itertools.product(range(1, 13), range(1, 13)):
      brute = sum(1 for i in range(t) for j in range(s) if j <= i + s - t)
      self.assertEqual(flops.visible_pairs(t, s, causal=True), brute, (t, s))

  def test_matmul_flops(self):
    self.assertEqual(flops.matmul_flops(2, 3, 4), 48)


class ChildProcessTest(absltest.TestCase):

  def _case(self, function, timeout_s=60, **kwargs):
    return processes.run_case(_THIS, function, kwargs, timeout_s=timeout_s)

  def test_peak_rss_is_the_childs_own(self):
    small = self._case("_allocate", mib=1)
    big = self._case("_allocate", mib=200)
    self.assertEqual(big["status"], "ok")
    self.assertGreater(big["rss_peak_mib"] - small["rss_peak_mib"], 150)
    self.assertLess(small["rss_peak_mib"], big["rss_peak_mib"])

  def test_children_reuse_freed_memory_unless_told_not_to(self):
    if not host_memory.supported():
      self.skipTest("the setting is for glibc")
    reused = processes.run_case(_THIS, "_refault_mib", {"mib": 128}, timeout_s=60)
    default = processes.run_case(_THIS, "_refault_mib", {"mib": 128}, timeout_s=60,
                              reuse_freed_memory=False)
    self.assertLess(reused["refaults"], 64)
    self.assertGreater(default["refaults"], 128 * 256 // 600)  # ~1 per 4 KiB page (fewer: THP)

  def test_memory_error_is_recorded_as_oom(self):
    result = self._case("_raise_memory_error")
    self.assertEqual(result["status"], "oom")
    self.assertIn("no room", result["reason"])

  def test_timeout_is_recorded(self):
    result = self._case("_sleep", timeout_s=3, seconds=60)
    self.assertEqual(result["status"], "timeout")
    self.assertLess(result["wall_s"], 30)

  def test_sigkill_is_recorded(self):
    result = self._case("_kill_self")
    self.assertEqual(result["status"], "killed")
    self.assertIn("SIGKILL", result["reason"])

  def test_skip_has_reason(self):
    result = self._case("_raise_skip")
    self.assertEqual((result["status"], result["reason"]), ("skipped", "not here"))


class PlanTest(absltest.TestCase):

  def test_every_impl_at_every_size(self):
    cases = kernels.plan("full")
    for group in kernels.GROUPS:
      sizes = kernels.SIZES["full"][group]
      self.assertLen([c for c in cases if c["group"] == group],
                     len(sizes) * len(kernels.IMPLS[group]))
    skipped = [c for c in cases if "skip" in c]
    self.assertTrue(skipped)
    self.assertTrue(all(c["impl"] == "longjax_pallas" and c["t"] > 8192 for c in skipped))

  def test_linear_alone_brings_its_softmax_comparator(self):
    cases = kernels.plan("full", groups=("linear",))
    softmax = sorted(c["t"] for c in cases if c["group"] == "attention")
    self.assertEqual(softmax, kernels.SIZES["full"]["linear"])
    self.assertTrue(all(c["impl"] == "longjax_auto" for c in cases if c["group"] == "attention"))
    self.assertEmpty([c for c in kernels.plan("full", groups=("scan",)) if c["group"] != "scan"])

  def test_without_torch_peers_are_skipped_with_a_reason(self):
    fake = mock.Mock(return_value={"status": "ok", "time_s": 1.0})
    with mock.patch.object(peers, "torch_missing", return_value="torch is not installed"), \
         mock.patch.object(processes, "run_case", fake):
      results = kernels.run("tiny", memory_budget=None)
    torch_rows = [r for r in results if r["impl"].startswith("torch")]
    self.assertLen(torch_rows, 3)  # attention, decode and scan have a torch peer
    for r in torch_rows:
      self.assertEqual((r["status"], r["reason"]), ("skipped", "torch is not installed"))
    self.assertEqual(fake.call_count, len(results) - len(torch_rows))


class ReportTest(absltest.TestCase):
  """Ratios, targets, tables and plots from made-up results at the full sizes (no child runs)."""

  def _fake_results(self):
    results = []
    for case in kernels.plan("full"):
      size = {k: case[k] for k in ("t", "cache", "length", "d_model") if k in case}
      n = kernels.size_of(case)
      slow = {"jax_nn": 4.0, "torch_sdpa": 2.0, "recurrent_scan": 3.0, "lax_scan": 2.0,
              "torch_loop": 5.0, "jnp_dense": 1.5}.get(case["impl"], 1.0)
      r = {"group": case["group"], "impl": case["impl"], **size, "status": "ok",
           "time_s": slow * n * 1e-6, "temp_bytes": int(slow * n), "rss_peak_mib": 300.0,
           "gflops_per_s": 100.0 / slow}
      if case["group"] == "linear":
        r["tokens_per_s"] = n / r["time_s"]
      if "skip" in case:
        r = {"group": case["group"], "impl": case["impl"], **size, "status": "skipped",
             "reason": case["skip"]}
      results.append(r)
    return results

  def test_ratios_targets_and_tables(self):
    results = self._fake_results()
    summary = kernels.derive(results, peak_gflops=150.0)
    auto = kernels.find(results, "attention", "longjax_auto", 16384)
    self.assertAlmostEqual(auto["speedup_vs_jax_nn"], 4.0)
    self.assertAlmostEqual(auto["speedup_vs_torch_sdpa"], 2.0)
    self.assertAlmostEqual(auto["temp_vs_jax_nn"], 0.25)
    self.assertAlmostEqual(auto["fraction_of_peak"], 100 / 150)
    met = {t["target"]: t["met"] for t in summary["targets"]}
    self.assertLen(met, 8)
    self.assertTrue(met["attention fwd+bwd at T=16k, longjax auto >= 3x faster than jax.nn"])
    self.assertFalse(met["attention fwd+bwd at T=16k, longjax auto compiled temp <= 1/8 of "
                         "jax.nn's"])
    self.assertAlmostEqual(summary["linear_flatness"]["pallas"]["ratio"], 1.0)
    md = kernels.markdown(results, summary)
    for title in ("Causal attention", "Decode attention", "Causal linear attention",
                  "Selective scan", "Targets"):
      self.assertIn(title, md)
    stem = os.path.join(self.create_tempdir().full_path, "k")
    self.assertLen(kernels.plot(results, stem), 4)

  def test_targets_not_measured_at_small_sizes(self):
    results = [r for r in self._fake_results() if kernels.size_of(r) <= 1024]
    summary = kernels.derive(results, peak_gflops=None)
    by_target = {t["target"]: t for t in summary["targets"]}
    at16k = by_target["attention fwd+bwd at T=16k, longjax auto >= 3x faster than jax.nn"]
    self.assertIsNone(at16k["met"])
    self.assertEqual(at16k["measured"], "not measured at these sizes")


class CliSmokeTest(absltest.TestCase):

  def test_help_and_bad_group(self):
    proc = _run_cli("--help")
    self.assertIn(proc.returncode, (0, 1), proc.stderr)  # absl's --help exits with 1
    self.assertIn("python -m experiments.benchmark", proc.stdout)
    self.assertIn("--suite", proc.stdout)
    out = os.path.join(self.create_tempdir().full_path, "x.json")
    proc = _run_cli("--suite=kernels", "--sizes=tiny", "--groups=attention,nope", f"--out={out}")
    self.assertEqual(proc.returncode, 2)
    self.assertIn("--groups: unknown ['nope']", proc.stderr)
    proc = _run_cli("--suite=mixers", "--sizes=tiny", "--groups=attention,mamba3", f"--out={out}")
    self.assertEqual(proc.returncode, 2)
    self.assertIn("--groups: unknown ['mamba3']; choose from attention,linear,", proc.stderr)

  def test_peak_suite(self):
    out = os.path.join(self.create_tempdir().full_path, "peak.json")
    proc = _run_cli("--suite=peak", "--sizes=tiny", f"--out={out}")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(out) as f:
      report = json.load(f)
    self.assertGreater(report["peak_f32_gflops_per_s"], 0)
    for name in ("f32", "bf16"):
      self.assertEqual(report["peak"][name]["status"], "ok")
    self.assertEqual("torch_f32" in report["peak"], _torch_installed())
    self.assertTrue(os.path.exists(out[:-len(".json")] + ".md"))
    self.assertIn("Matmul peak", proc.stdout)

  def test_kernels_suite_tiny(self):
    # The CLI, child processes, report and plots on two groups; every case function of every
    # group runs in CasesTest (in-process: no interpreter start per case).
    out = os.path.join(self.create_tempdir().full_path, "kernels.json")
    proc = _run_cli("--suite=kernels", "--sizes=tiny", "--groups=attention,scan", f"--out={out}",
                    "--plot")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(out) as f:
      report = json.load(f)
    self.assertGreater(report["peak_f32_gflops_per_s"], 0)
    self.assertEqual(report["machine"]["cpu_count"], os.cpu_count())
    seen = {(c["group"], c["impl"]): c for c in report["cases"]}
    expected = {(g, i) for g in ("attention", "scan") for i in kernels.IMPLS[g]}
    self.assertEqual(set(seen), expected)
    for (group, impl), case in seen.items():
      with self.subTest(group=group, impl=impl):
        if impl.startswith("torch") and not _torch_installed():
          self.assertEqual(case["status"], "skipped")
          self.assertTrue(case["reason"])
          continue
        self.assertEqual(case["status"], "ok", case.get("reason"))
        self.assertTrue(math.isfinite(case["time_s"]) and case["time_s"] > 0)
        self.assertGreater(case["rss_peak_mib"], 0)
        if not impl.startswith("torch"):
          self.assertGreaterEqual(case["temp_bytes"], 0)
    attention = seen[("attention", "longjax_auto")]
    self.assertGreater(attention["gflops_per_s"], 0)
    self.assertIsNotNone(attention["speedup_vs_jax_nn"])
    md_path = out[:-len(".json")] + ".md"
    self.assertTrue(os.path.exists(md_path))
    with open(md_path) as f:
      self.assertIn("Causal attention fwd+bwd", f.read())
    self.assertIn("Selective scan fwd+bwd", proc.stdout)
    for plot in report["plots"]:
      self.assertTrue(os.path.exists(plot), plot)


class CasesTest(absltest.TestCase):

  def test_every_case_runs_in_process(self):
    from longjax.benchmarks import kernel_cases  # pylint: disable=g-import-not-at-top
    done = set()
    for case in kernels.plan("tiny"):
      impl = case["impl"]
      size = {k: case[k] for k in ("t", "cache", "length", "d_model") if k in case}
      key = (case["function"], impl, tuple(size.items()))
      if key in done or (impl.startswith("torch") and not _torch_installed()):
        continue
      done.add(key)
      with self.subTest(group=case["group"], impl=impl):
        result = getattr(kernel_cases, case["function"])(impl, **size, repeats=1, budget_s=1,
                                                         memory_budget=None)
        self.assertTrue(math.isfinite(result["time_s"]) and result["time_s"] > 0)
        if not impl.startswith("torch"):
          self.assertGreaterEqual(result["temp_bytes"], 0)
    self.assertContainsSubset({(g, i) for g, impls in kernels.IMPLS.items() for i in impls
                               if not i.startswith("torch")},
                              {(f.split("_case")[0], i) for f, i, _ in done})

if __name__ == "__main__":
  absltest.main()
