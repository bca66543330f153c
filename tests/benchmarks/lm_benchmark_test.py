"""The train, decode and memory suites: the HF peer is our model, FLOP counts, bisection, CLI."""

import importlib.util
import json
import os
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from longjax.benchmarks import decode
from longjax.benchmarks import flops
from longjax.benchmarks import lm
from longjax.benchmarks import memory
from longjax.benchmarks import summary
from longjax.benchmarks import timing
from longjax.benchmarks import train
from tests.benchmarks.kernels_benchmark_test import _run_cli

_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
_NO_HF = "torch and transformers (the bench extra) are not installed"


class TimeJaxTest(absltest.TestCase):

  def test_carry_feeds_each_result_to_the_next_call_and_keeps_the_callers_state(self):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    def step(state, x):
      return state + x, state.sum()

    state = jnp.zeros((4,))
    measured = timing.time_jax(step, (state, jnp.ones((4,))), repeats=3, budget_s=60,
                               memory_budget_bytes=None, carry=True)
    # Calling again with a donated (deleted) state would raise: each call got the previous
    # result. The caller's array was copied first, so it is alive and unchanged.
    self.assertEqual(measured["repeats"], 3)
    np.testing.assert_array_equal(state, np.zeros(4))
    self.assertEqual(measured["alias_bytes"], 16)  # the new state reuses the donated buffer


  def test_warmup_calls_are_untimed_and_the_first_is_reported(self):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    def step(state, x):
      return state + x, state.sum()

    measured = timing.time_jax(step, (jnp.zeros(()), jnp.ones(())), repeats=2, budget_s=60,
                               memory_budget_bytes=None, carry=True, warmup=3)
    self.assertEqual((measured["repeats"], len(measured["times_s"])), (2, 2))
    calls = []  # 3 warm-up calls, then 4 timed
    eager = timing.time_callable(lambda: calls.append(1), repeats=4, budget_s=60, warmup=3)
    self.assertEqual((len(calls), eager["repeats"], len(eager["times_s"])), (7, 4, 4))
    self.assertGreater(eager["first_call_s"], 0)

class RoundsTest(absltest.TestCase):

  def test_each_case_keeps_its_fastest_round_in_the_first_rounds_order(self):
    shapes = [lm.LMShape(64, 2, 64, 2), lm.LMShape(128, 2, 64, 1)]
    times = {  # (impl, width) -> time_s in round 1, round 2
        ("longjax", 64): (2.0, 1.5), ("hf_llama", 64): (1.0, 3.0),
        ("longjax", 128): (4.0, 5.0), ("hf_llama", 128): (6.0, 6.5)}
    orders = []

    def fake_run_cases(module, function, cfg, impls, **unused):
      del module, function, unused
      orders.append(impls)
      round_index = len(orders) - 1
      return [{"impl": impl, "width": s.width, "layers": s.layers, "t": s.t, "batch": s.batch,
               "status": "ok", "time_s": times[impl, s.width][round_index]}
              for s in cfg["shapes"] for impl in impls]

    sizes = {"rounds_test": {"shapes": shapes, "repeats": 1, "budget_s": 1, "timeout_s": 1,
                             "rounds": 2}}
    with mock.patch.dict(train.SIZES, sizes), mock.patch.object(lm, "run_cases", fake_run_cases):
      rows = train.run("rounds_test", impls=("longjax", "hf_llama"), memory_budget=None)
    self.assertEqual(orders, [("longjax", "hf_llama"), ("hf_llama", "longjax")])
    self.assertEqual([(r["impl"], r["width"], r["time_s"], r["round_times_s"]) for r in rows],
                     [("longjax", 64, 1.5, [2.0, 1.5]), ("hf_llama", 64, 1.0, [1.0, 3.0]),
                      ("longjax", 128, 4.0, [4.0, 5.0]), ("hf_llama", 128, 6.0, [6.0, 6.5])])


class ModelTest(parameterized.TestCase):

  def test_matmul_params_by_hand(self):
    # width 128 (2 heads of 64), MLP 320, vocab 259, 2 layers: q, k, v, out 128x128 each;
    # gate, up 128x320 and down 320x128; head 128x259.
    shape = lm.LMShape(128, 2, 64, 1)
    self.assertEqual(shape.mlp_hidden, 320)
    per_layer = 4 * 128 * 128 + 3 * 128 * 320
    self.assertEqual(lm.matmul_params(shape), 2 * per_layer + 128 * 259)
    self.assertEqual(lm.total_params(shape),
                     lm.matmul_params(shape) + 259 * 128 + 5 * 128)

  def test_counts_match_the_longjax_model(self):
    shape = lm.LMShape(128, 2, 64, 1)
    _, params, _ = lm.build_longjax(shape)
    self.assertEqual(lm.count(params), lm.total_params(shape))
    lookup_and_norms = params["embed"].size + sum(
        x.size for x in [params["final_norm"]["scale"], params["groups"][0]["mixer_norm"]["scale"],
                         params["groups"][0]["mlp_norm"]["scale"]])
    self.assertEqual(lm.count(params) - lookup_and_norms, lm.matmul_params(shape))

  @absltest.skipUnless(_HF, _NO_HF)
  def test_hf_llama_is_the_same_model(self):
    """Same parameter count and, with our weights copied in, the same logits (f32: 1e-4)."""
    import torch  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    shape = lm.LMShape(128, 2, 48, 2)
    graphdef, params, _ = lm.build_longjax(shape)
    hf = lm.build_hf_llama(shape)
    self.assertEqual(sum(p.numel() for p in hf.parameters()), lm.count(params))
    lm.copy_to_hf(params, hf)
    tokens = np.random.default_rng(1).integers(0, shape.vocab, (2, 48), dtype=np.int32)
    ours, _ = nnx.merge(graphdef, params)(tokens)
    with torch.no_grad():
      theirs = hf(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-4, atol=1e-4)


class FlopsTest(absltest.TestCase):

  def test_lm_train_flops_by_hand(self):
    # 1000 matmul params, B=2, T=4: dense 6 * 1000 * 8; attention: 1 layer, 1 head of 2,
    # causal pairs 4*5/2 = 10 per sequence, forward 2 matmuls x 2 FLOPs x 2 features = 8 per
    # pair, x 3 (fwd + bwd) x 2 sequences.
    got = flops.lm_train_flops(matmul_params=1000, layers=1, heads=1, head_dim=2, t=4, batch=2)
    self.assertEqual(got, 6 * 1000 * 8 + 3 * 2 * 10 * 8)

  def test_train_model_flops_grow_with_layers_and_length(self):
    a = train.model_flops(lm.LMShape(256, 4, 512, 1))
    self.assertGreater(train.model_flops(lm.LMShape(256, 8, 512, 1)), 1.9 * a)
    self.assertGreater(train.model_flops(lm.LMShape(256, 4, 1024, 1)), 2 * a)


class BisectionTest(parameterized.TestCase):

  @parameterized.parameters(0, 1, 2, 3, 5, 8, 13, 31, 32, 33, 64, 100)
  def test_finds_the_threshold(self, limit_steps):
    step, max_t = 16, 16 * 64
    calls = []

    def fits(t):
      calls.append(t)
      return t <= limit_steps * step
    longest, failing = memory.longest_fitting(fits, step, max_t)
    expected = min(limit_steps, 64) * step or None
    self.assertEqual(longest, expected)
    if expected is None:
      self.assertEqual(failing, step)
    elif expected == max_t:
      self.assertIsNone(failing)
    else:
      self.assertEqual(failing, expected + step)
    self.assertTrue(all(t % step == 0 and step <= t <= max_t for t in calls))
    self.assertLessEqual(len(calls), 14)  # doubling + bisection, not a linear scan


class ReportTest(absltest.TestCase):

  def _row(self, impl, t, tokens_per_s, width=512):
    return {"impl": impl, "width": width, "layers": 8, "t": t, "batch": 1, "status": "ok",
            "tokens_per_s": tokens_per_s, "gflops_per_s": tokens_per_s / 10}

  def test_train_ratios_and_targets(self):
    results = [self._row("longjax", 1024, 500), self._row("hf_llama", 1024, 400),
               self._row("longjax", 8192, 300), self._row("hf_llama", 8192, 400)]
    summary = train.derive(results, peak_gflops=100.0)
    self.assertAlmostEqual(results[0]["speedup_vs_hf"], 1.25)
    self.assertAlmostEqual(results[2]["speedup_vs_hf"], 0.75)
    self.assertAlmostEqual(results[0]["mfu"], 0.5)
    met = [t["met"] for t in summary["targets"]]
    self.assertEqual(met, [True, False, False])
    self.assertIn("0.75x", summary["targets"][1]["measured"])
    md = train.markdown(results, summary)
    self.assertIn("| **no** |", md)

  def test_decode_ratio_and_target(self):
    results = [{"impl": "longjax", "width": 512, "layers": 8, "t": 4096, "status": "ok",
                "decode_ms_per_token": 20.0, "prefill_tokens_per_s": 3000.0},
               {"impl": "hf_llama", "width": 512, "layers": 8, "t": 4096, "status": "ok",
                "decode_ms_per_token": 30.0, "prefill_tokens_per_s": 1000.0}]
    summary = decode.derive(results)
    self.assertAlmostEqual(results[0]["decode_speedup_vs_hf"], 1.5)
    self.assertAlmostEqual(results[0]["prefill_speedup_vs_hf"], 3.0)
    self.assertTrue(summary["targets"][0]["met"])


class ReadmeTableTest(absltest.TestCase):

  def test_rows_from_reports(self):
    machine = {"command": "python -m experiments.benchmark --suite=X", "processor": "cpu",
               "cpu_count": 2, "jax": "0", "torch": None, "time": "now"}
    size = {"width": 512, "layers": 8, "t": 1024, "batch": 4}
    train_report = {"suite": "train", "machine": machine, "peak_f32_gflops_per_s": 100.0,
                    "cases": [{"impl": "longjax", **size, "status": "ok", "tokens_per_s": 500.0,
                               "mfu": 0.5, "speedup_vs_hf": 1.25},
                              {"impl": "hf_llama", **size, "status": "ok",
                               "tokens_per_s": 400.0}]}
    memory_report = {"suite": "memory", "machine": machine, "memory_budget_bytes": 2**31,
                     "cases": [{"impl": "blockwise", "remat": "full", "width": 1024,
                                "layers": 8, "longest_t": 32768},
                               {"impl": "hf_llama", "longest_t": 8192, "extrapolated": True}]}
    paths = []
    for name, report in (("train", train_report), ("memory", memory_report)):
      paths.append(os.path.join(self.create_tempdir().full_path, f"{name}.json"))
      with open(paths[-1], "w") as f:
        json.dump(report, f)
    md = summary.readme_markdown(paths)
    self.assertIn("| train step tokens/s, d512 L8 T1024 B4 | 500 (MFU 50%) | HF Llama 400 | "
                  "1.25 |", md)
    self.assertIn("| longest train T in 2.0 GiB, d1024 L8 B1 | 32768 (blockwise, remat full) | "
                  "HF Llama 8192 (extrapolated) | 4 |", md)
    self.assertIn(machine["command"], md)
    self.assertNotIn("**cpu**", md)  # one machine: one table, no heading

  def test_one_table_per_machine(self):
    paths = []
    for processor in ("AMD EPYC", "Intel Xeon"):
      machine = {"command": f"run on {processor}", "processor": processor, "cpu_count": 2,
                 "jax": "0", "torch": None, "time": "now"}
      report = {"suite": "train", "machine": machine, "peak_f32_gflops_per_s": 100.0,
                "cases": [{"impl": "longjax", "width": 256, "layers": 4, "t": 512, "batch": 8,
                           "status": "ok", "tokens_per_s": 500.0, "mfu": 0.5,
                           "speedup_vs_hf": 1.0 if processor == "AMD EPYC" else 0.8}]}
      paths.append(os.path.join(self.create_tempdir().full_path, "train.json"))
      with open(paths[-1], "w") as f:
        json.dump(report, f)
    md = summary.readme_markdown(paths)
    amd, intel = md.split("**Intel Xeon**")
    self.assertTrue(amd.startswith("**AMD EPYC**"))
    self.assertIn("| 1 |", amd)
    self.assertIn("run on AMD EPYC", amd)
    self.assertIn("| 0.8 |", intel)
    self.assertIn("run on Intel Xeon", intel)


class ReadmeIsGeneratedTest(absltest.TestCase):

  def test_readme_table_is_the_reports_output(self):
    """The README's benchmark table is exactly what the script makes of the checked-in JSON."""
    from tests import testing  # pylint: disable=g-import-not-at-top
    names = ("train_full", "decode_full", "memory_full", "train_full_xeon", "decode_full_xeon")
    paths = [f"docs/benchmarks/{n}.json" for n in names]
    cwd = os.getcwd()
    os.chdir(testing.REPO_ROOT)
    try:
      table = summary.readme_markdown(paths)
      with open("README.md", encoding="utf-8") as f:
        readme = f.read()
    finally:
      os.chdir(cwd)
    self.assertIn(table.strip(), readme)


class CliTest(absltest.TestCase):
  """Every suite end to end at tiny sizes (peers skipped, with the reason, without torch)."""

  def _run(self, suite):
    tmp = self.create_tempdir().full_path  # removed after the test
    out = os.path.join(tmp, f"{suite}.json")
    proc = _run_cli(f"--suite={suite}", "--sizes=tiny", f"--out={out}", "--plot")
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    with open(out) as f:
      report = json.load(f)
    self.assertTrue(os.path.exists(os.path.join(tmp, f"{suite}.md")))
    return report, proc.stdout, tmp

  def _check_peer(self, cases):
    for case in cases:
      if case["impl"] == "hf_llama":
        if _HF:
          self.assertEqual(case["status"], "ok", case)
        else:
          self.assertEqual(case["status"], "skipped")
          self.assertIn("pip install", case["reason"])
      else:
        self.assertEqual(case["status"], "ok", case)

  def test_train(self):
    report, stdout, tmp = self._run("train")
    self.assertEqual({c["impl"] for c in report["cases"]}, set(train.IMPLS))
    self._check_peer(report["cases"])
    ours = [c for c in report["cases"] if c["impl"] == "longjax"][0]
    self.assertGreater(ours["tokens_per_s"], 0)
    self.assertEqual(ours["params"], lm.total_params(lm.LMShape(64, 2, 64, 2)))
    self.assertIn("Train step", stdout)
    self.assertTrue(os.path.exists(os.path.join(tmp, "train_train.png")))

  def test_decode(self):
    report, stdout, tmp = self._run("decode")
    self._check_peer(report["cases"])
    ours = [c for c in report["cases"] if c["impl"] == "longjax"][0]
    self.assertGreater(ours["decode_ms_per_token"], 0)
    self.assertIn("decode ms/token", stdout)
    self.assertTrue(os.path.exists(os.path.join(tmp, "decode_decode.png")))

  def test_memory(self):
    report, stdout, tmp = self._run("memory")
    self.assertTrue(os.path.exists(os.path.join(tmp, "memory_memory.png")))
    ours = [c for c in report["cases"] if c["impl"] != "hf_llama"]
    self.assertTrue(ours and all(c["longest_t"] for c in ours), ours)
    for c in ours:
      for probe in c["probes"]:
        self.assertEqual(probe["fits"], probe["footprint_bytes"] <= report["memory_budget_bytes"])
    self.assertIn("Longest trainable T", stdout)


if __name__ == "__main__":
  absltest.main()
