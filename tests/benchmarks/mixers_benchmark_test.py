"""The mixers suite: every implementation is a valid model config, one case runs in-process and
reports its figures, and the ratios and targets follow from the numbers (synthetic results)."""

from absl.testing import absltest

from longjax import configuration
from longjax.benchmarks import flops
from longjax.benchmarks import lm
from longjax.benchmarks import mixers


def _row(impl, t, tokens_per_s, footprint, decode_ms):
  return {"impl": impl, "t": t, "width": 64, "layers": 2, "status": "ok",
          "tokens_per_s": tokens_per_s, "train_footprint_bytes": footprint,
          "decode_ms_per_token": decode_ms}


class MixersSuiteTest(absltest.TestCase):

  def test_every_impl_is_a_valid_model(self):
    for impl in mixers.IMPLS:
      cfg = lm.longjax_config(lm.LMShape(64, 2, 128, 1), model_overrides=mixers.IMPLS[impl])
      configuration.validate_model(cfg.model)
    self.assertEqual({c["model_overrides"].get("mixers", "attention")
                      for c in ({"model_overrides": o} for o in mixers.IMPLS.values())},
                     {"attention", *mixers.RECURRENT})

  def test_full_plan_runs_the_scan_peers_at_the_first_length_only(self):
    cases = mixers.plan("full")
    skipped = {(c["labels"]["impl"], c["labels"]["t"]) for c in cases if "skip" in c}
    self.assertEqual(skipped, {(f"{name}_scan", t) for name in mixers.RECURRENT
                               for t in (4096, 16384, 32768)})
    self.assertEmpty([c for c in mixers.plan("small") if "skip" in c])
    # --lengths replaces the set's lengths, keeping its width and depth.
    lengths = {(c["labels"]["t"], c["labels"]["width"]) for c in mixers.plan("full",
                                                                            lengths=[2048])}
    self.assertEqual(lengths, {(2048, 512)})

  def test_one_case_in_process(self):
    result = mixers.mixer_case("retnet", 64, 1, 32, repeats=1, budget_s=5, memory_budget=None)
    self.assertGreater(result["tokens_per_s"], 0)
    self.assertGreater(result["train_footprint_bytes"], 0)
    self.assertGreater(result["decode_ms_per_token"], 0)

  def test_flop_counts(self):
    # The chunked form's count against a brute-force count of its products.
    t, c, n, dk, dv = 150, 64, 2, 5, 3
    pairs = sum(1 for i in range(t) for j in range(i + 1) if i // c == j // c)
    want = 3 * 2 * n * (pairs * (dk + dv) + 2 * t * dk * dv)
    self.assertEqual(flops.chunked_linear_attention_flops(t, n, dk, dv, c, backward=True), want)
    self.assertEqual(flops.window_pairs(10, 4), sum(min(i + 1, 4) for i in range(10)))
    # `linear` has attention's projections (q, k, v, out: 4 d n), so the two models differ only
    # in the sequence mixing: the chunked form with the normaliser's column vs causal softmax.
    shape = lm.LMShape(64, 2, 256, 1)
    attention = mixers.train_flops("attention", 64, 2, 256)
    self.assertEqual(attention, flops.lm_train_flops(
        matmul_params=lm.matmul_params(shape), layers=2, heads=shape.heads,
        head_dim=lm.HEAD_DIM, t=256, batch=1))
    linear_mixing = flops.chunked_linear_attention_flops(256, shape.heads, lm.HEAD_DIM,
                                                         lm.HEAD_DIM + 1, 64, backward=True)
    causal = 3 * flops.attention_flops(256, 256, shape.heads, lm.HEAD_DIM, causal=True,
                                       backward=False)
    self.assertEqual(mixers.train_flops("linear", 64, 2, 256) - attention,
                     2 * (linear_mixing - causal))
    self.assertEqual(mixers.train_flops("linear_scan", 64, 2, 256),
                     mixers.train_flops("linear", 64, 2, 256))

  def test_ratios_and_targets(self):
    results = [_row("attention", 1024, 1000.0, 100, 1.0), _row("attention", 32768, 10.0, 4000, 9.0),
               _row("linear", 1024, 2000.0, 80, 0.5), _row("linear", 32768, 1900.0, 90, 0.52),
               _row("linear_scan", 1024, 500.0, 80, 0.5), _row("linear_scan", 32768, 400.0, 90,
                                                               0.5)]
    results[3]["gflops_per_s"] = 25.0
    summary = mixers.derive(results, peak_gflops=100.0)
    linear_long = results[3]
    self.assertAlmostEqual(linear_long["fraction_of_peak"], 0.25)
    self.assertAlmostEqual(linear_long["speedup_vs_attention"], 190.0)
    self.assertAlmostEqual(linear_long["speedup_vs_scan"], 1900.0 / 400.0)
    self.assertAlmostEqual(linear_long["memory_vs_attention"], 90 / 4000)
    targets = {t["target"]: t for t in summary["targets"]}
    flat = targets["linear tokens/s at T=32768 >= 0.9x at T=1024 (flat)"]
    self.assertEqual((flat["measured"], flat["met"]), ("0.95", True))
    decode = targets["linear decode ms/token at T=32768 within 1.1x of T=1024"]
    self.assertEqual((decode["measured"], decode["met"]), ("1.04", True))
    self.assertTrue(targets["linear train memory at T=32768 <= 1/4 of attention's"]["met"])
    self.assertIn("| 32768 | linear (auto: chunked) |", mixers.markdown(results, summary))

  def test_hf_peers_have_longjax_mixer_only_models_parameter_for_parameter(self):
    # The like-for-like claim of the x HF column: same configuration, so the same parameters.
    from longjax.benchmarks import peers  # pylint: disable=g-import-not-at-top
    missing = peers.torch_missing(("torch", "transformers"))
    if missing:
      self.skipTest(missing)
    shape = lm.LMShape(64, 2, 128, 1)
    for peer, ours in mixers.HF_PEERS.items():
      hf = sum(p.numel() for p in mixers.build_hf_mamba(peer, shape).parameters())
      _, params, _ = lm.build_longjax(shape, model_overrides=mixers.IMPLS[ours])
      self.assertEqual(lm.count(params), hf, peer)

  def test_hf_ratios_and_targets(self):
    results = [_row("mamba_pure", 2048, 900.0, 80, 4.0), _row("hf_mamba", 2048, 100.0, None, 5.0),
               _row("mamba2_pure", 2048, 800.0, 80, 6.0), _row("hf_mamba2", 2048, 400.0, None,
                                                                5.0)]
    targets = {t["target"]: t for t in mixers.derive(results)["targets"]}
    self.assertAlmostEqual(results[0]["speedup_vs_hf"], 9.0)
    self.assertIsNone(results[1]["memory_vs_attention"])
    got = {name: (t["measured"], t["met"]) for name, t in targets.items() if "HF" in name}
    self.assertEqual(got, {
        "mamba_pure train tokens/s >= 1.5x HF MambaForCausalLM at T=2048": ("9.00", True),
        "mamba_pure decode ms/token <= HF MambaForCausalLM's at T=2048": ("0.80", True),
        "mamba2_pure decode ms/token <= HF Mamba2ForCausalLM's at T=2048": ("1.20", False)})
    self.assertIn("| 2048 | HF MambaForCausalLM (torch, f32) |", mixers.markdown(
        results, {"targets": []}))

  def test_mamba_targets_at_the_lengths_they_name(self):
    results = [_row("attention", 2048, 1000.0, 100, 1.0), _row("mamba", 2048, 600.0, 80, 0.5),
               _row("mamba_scan", 2048, 200.0, 80, 0.5), _row("attention", 8192, 300.0, 400, 1.0),
               _row("mamba", 8192, 290.0, 90, 0.5)]
    targets = {t["target"]: t for t in mixers.derive(results)["targets"]}
    got = {name: (t["measured"], t["met"]) for name, t in targets.items()
           if name.startswith("mamba train tokens")}
    self.assertEqual(got, {
        "mamba train tokens/s >= 2x its lax.scan recurrence at T=2048": ("3.00", True),
        "mamba train tokens/s >= 2x its lax.scan recurrence at T=8192": ("not measured", None),
        "mamba train tokens/s >= 0.5x softmax attention at T=2048": ("0.60", True),
        "mamba train tokens/s >= 1x softmax attention at T=8192": ("0.97", False)})


if __name__ == "__main__":
  absltest.main()
