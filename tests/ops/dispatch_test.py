"""Tests for longjax.ops.dispatch: the one rule that resolves `impl` for every op.

A made-up op whose checks read a dict stands in for a real call, so the rule is checked on its
own; the attention tables are checked on real calls in attention_test and attention_bundled_test.
"""

from absl.testing import absltest

from longjax.ops import dispatch


def _op():
  # "fast" serves short calls on the gpu only; "dense" could serve anything but "auto" passes it
  # over for long calls; "loop" serves everything.
  fast = dispatch.Implementation(
      "fast", unsupported=lambda call, ctx: (None if ctx.backend == "gpu" and call["n"] <= 8
                                             else f"n={call['n']} on {ctx.backend}"))
  dense = dispatch.Implementation(
      "dense", passed_over=lambda call, ctx: None if call["n"] <= 4 else "too long")
  loop = dispatch.Implementation("loop")
  return dispatch.Op("toy", (fast, dense, loop),
                     preference={"cpu": ("dense", "loop"), "gpu": ("fast", "dense", "loop")})


class ResolveTest(absltest.TestCase):

  def test_auto_takes_the_first_that_serves_and_says_why(self):
    op = _op()
    self.assertEqual(dispatch.resolve(op, "auto", {"n": 8}, backend="gpu").impl, "fast")
    long_gpu = dispatch.resolve(op, "auto", {"n": 16}, backend="gpu")
    self.assertEqual(long_gpu.impl, "loop")
    self.assertIn("not fast: n=16 on gpu; not dense: too long", long_gpu.reason)
    self.assertEqual(dispatch.resolve(op, "auto", {"n": 2}, backend="cpu").impl, "dense")
    # A backend without its own order uses the CPU's.
    self.assertEqual(dispatch.resolve(op, "auto", {"n": 2}, backend="tpu").impl, "dense")

  def test_forced_impl_ignores_preference_but_not_support(self):
    op = _op()
    self.assertEqual(dispatch.resolve(op, "dense", {"n": 100}, backend="cpu"),
                     dispatch.Resolution("dense", "requested"))
    with self.assertRaisesRegex(ValueError, "impl='fast' cannot serve this call: n=2 on cpu"):
      dispatch.resolve(op, "fast", {"n": 2}, backend="cpu")
    with self.assertRaisesRegex(ValueError, r"impl='slow' is not an implementation of toy; valid "
                                r"choices: \('auto', 'fast', 'dense', 'loop'\)"):
      dispatch.resolve(op, "slow", {"n": 2})

  def test_sharding_reaches_the_checks(self):
    # A sequence-parallel implementation is one more entry whose check asks for a sharding.
    ring = dispatch.Implementation(
        "ring", unsupported=lambda call, ctx: None if ctx.sharding else "sequence not sharded")
    op = dispatch.Op("toy", (ring, dispatch.Implementation("loop")),
                     preference={"cpu": ("ring", "loop")})
    self.assertEqual(dispatch.resolve(op, "auto", {}, backend="cpu").impl, "loop")
    self.assertEqual(dispatch.resolve(op, "auto", {}, backend="cpu", sharding="seq").impl,
                     "ring")

  def test_nothing_serves(self):
    never = dispatch.Implementation("never", unsupported=lambda call, ctx: "no")
    op = dispatch.Op("toy", (never,), preference={"cpu": ("never",)})
    with self.assertRaisesRegex(ValueError, "no toy implementation serves this call on cpu: "
                                "not never: no"):
      dispatch.resolve(op, "auto", {}, backend="cpu")

  def test_bad_tables_are_refused(self):
    loop = dispatch.Implementation("loop")
    with self.assertRaisesRegex(ValueError, "unknown ones \\['fast'\\]"):
      dispatch.Op("toy", (loop,), preference={"cpu": ("fast", "loop")})
    with self.assertRaisesRegex(ValueError, "needs a 'cpu' order"):
      dispatch.Op("toy", (loop,), preference={"gpu": ("loop",)})


if __name__ == "__main__":
  absltest.main()
