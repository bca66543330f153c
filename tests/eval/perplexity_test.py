"""Loss-vs-length evaluation: causal prefix identity, bits per byte, unigram baseline, plots."""

import math
import os

from absl.testing import absltest
from flax import nnx
import numpy as np

from longjax.data import ByteTokenizer
from longjax.eval import perplexity, plots
from longjax.models import build_model
from tests import testing


class LengthSweepTest(absltest.TestCase):

  def test_prefix_identity_and_bits_per_byte(self):
    config = testing.tiny_config()
    model = build_model(config.model, vocab_size=259, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    rng = np.random.RandomState(0)
    sequences = np.concatenate([np.ones((3, 1)), rng.randint(3, 259, (3, 64))], 1).astype(np.int32)
    result = perplexity.length_sweep(graphdef, params, sequences=sequences, lengths=[16, 64],
                                     batch_size=2, tokenizer=ByteTokenizer(), progress=False)
    short, long = (np.asarray(result["per_position"][k]) for k in ("16", "64"))
    # A causal model's loss at position i cannot depend on tokens after i.
    np.testing.assert_allclose(short, long[:16], atol=1e-5)
    self.assertAlmostEqual(result["loss"][1], float(long.mean()), places=5)
    # Byte tokens: one byte per target, so bits/byte = nats/token / ln 2.
    for loss, bpb in zip(result["loss"], result["bits_per_byte"]):
      self.assertAlmostEqual(bpb, loss / math.log(2), places=5)
    # An untrained model is close to uniform over 259 tokens.
    self.assertLess(abs(result["loss"][0] - math.log(259)), 1.0)


class FillableSweepTest(absltest.TestCase):

  def test_lengths_past_the_documents_are_skipped_with_the_reason(self):
    # Two documents of 100 and 40 bytes (101 and 41 tokens with BOS): two sequences reach
    # length 32 (33 tokens), only one reaches 64 or 128.
    source = [{"text": "a" * 100}, {"text": "b" * 40}]
    sequences, kept, skipped = perplexity.fillable_sweep(
        source, ByteTokenizer(), lengths=[128, 16, 32, 64], count=2)
    self.assertEqual(kept, [16, 32])
    self.assertEqual([s["length"] for s in skipped], [64, 128])
    self.assertIn("Only 1 of 2 documents have >= 65 tokens", skipped[0]["reason"])
    self.assertEqual(sequences.shape, (2, 33))
    with self.assertRaisesRegex(ValueError, "Only 0 of 2 documents have >= 201 tokens"):
      perplexity.fillable_sweep(source, ByteTokenizer(), lengths=[200], count=2)


class UnigramTest(absltest.TestCase):

  def test_matches_brute_force(self):
    tok = ByteTokenizer()
    train = [{"text": b"aab"}, {"text": b"ab"}]
    validation = [{"text": b"ba"}]
    counts = np.ones(259)
    for ch in "aabab":
      counts[ord(ch) + 3] += 1
    p = counts / counts.sum()
    expected = -(np.log(p[ord("b") + 3]) + np.log(p[ord("a") + 3])) / 2
    self.assertAlmostEqual(perplexity.unigram_baseline(train, validation, tok), expected,
                           places=10)


class PlotsTest(absltest.TestCase):

  def test_plots_are_pngs(self):
    out = self.create_tempdir().full_path
    sweep = {"lengths": [8, 16], "loss": [2.0, 2.5], "bits_per_byte": [2.9, 3.6],
             "per_position": {"8": [3.0] * 8, "16": list(np.linspace(3, 2, 16))}}
    paths = [plots.loss_vs_length({"a": sweep, "b": sweep}, 8, os.path.join(out, "l.png")),
             plots.loss_vs_position({"a": sweep}, 8, os.path.join(out, "p.png")),
             plots.training_curve([{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0,
                                                            "val_loss": 2.1}],
                                  os.path.join(out, "t.png"), baseline=3.2)]
    for path in paths:
      with open(path, "rb") as f:
        self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


if __name__ == "__main__":
  absltest.main()
