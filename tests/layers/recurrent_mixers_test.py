"""The contract every recurrent mixer of the registry meets (a new one is covered by adding it
to the registry): prefill == token-by-token decode through its constant-size state, alone and
in a hybrid with softmax attention; the state does not grow with the context; packed documents
== each document alone; a tiny model's loss falls; the quickstart trains, evaluates and
generates with it. Each mixer's own maths is checked against its reference in its own file."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from longjax import experiment
from longjax import runs
from longjax.layers import caches
from longjax.models import MIXERS
from longjax.models import build_model
from longjax.models.generate import generate
from tests import testing
from tests.models.learned_bias_model_test import train_on_counting
from tests.models.lm_test import _forward
from tests.models.lm_test import decode_one_by_one
from tests.models.lm_test import tiny_model_config

# Every mixer whose cache does not grow with the context (softmax attention's and landmark
# attention's do).
RECURRENT = sorted(name for name, spec in MIXERS.items()
                   if not {caches.KVCache, caches.BlockKVCache} & set(spec.cache_types))
# Chunks of 4 over 11 tokens: a prefill of 5 crosses a chunk edge and ends in a partial chunk;
# Based's window of 3 slides within the prefill and the decode.
_SMALL_CHUNKS = {f"{MIXERS[name].section}.chunk_size": 4 for name in RECURRENT}
_SMALL_CHUNKS["based.window"] = 3
# One layer per kind of cache (an SSM state, a linear-attention state, a complex S4D state, a
# growing KV cache): the stacking and cache threading a hybrid adds are the same for every
# mixer, each of which the per-mixer cases cover alone (all ten in one model took 20 s).
HYBRID = "mamba,gla,s4d,attention"


class DecodeTest(parameterized.TestCase):

  def test_the_registry_has_recurrent_mixers(self):
    self.assertContainsSubset({"based", "gla", "lightning", "linear", "retnet"}, RECURRENT)

  # Each mixer alone, and one hybrid holding every recurrent mixer and softmax attention (one
  # compiled model covers "in a hybrid" for all of them).
  @parameterized.parameters(*RECURRENT, HYBRID)
  def test_prefill_equals_token_by_token_decode(self, mixers):
    cfg = tiny_model_config(mixers=mixers, num_layers=len(mixers.split(",")), **_SMALL_CHUNKS)
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 11)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    # A prompt of 5 in one call (chunked, from the empty state), then one token at a time.
    prefix, cache = _forward(graphdef, params, tokens[:, :5], None, model.init_cache(2, 16))
    rest, cache = decode_one_by_one(graphdef, params, tokens[:, 5:], cache)
    np.testing.assert_allclose(jnp.concatenate([prefix, rest], axis=1), full, atol=2e-5,
                               rtol=0)
    self.assertEqual([int(c.end) for c in cache], [11] * len(cache))

  @parameterized.parameters(*RECURRENT)
  def test_state_is_constant_in_the_length(self, name):
    model = build_model(tiny_model_config(mixers=name), vocab_size=50, rngs=nnx.Rngs(0))
    short, long = model.init_cache(2, 16), model.init_cache(2, 1 << 20)
    self.assertIsInstance(short[0], MIXERS[name].cache_types)
    self.assertEqual(jax.tree.map(jnp.shape, short), jax.tree.map(jnp.shape, long))
    self.assertGreater(short[0].state_bytes_per_sequence, 0)


class DocumentsTest(parameterized.TestCase):

  @parameterized.parameters(*RECURRENT)
  def test_packed_documents_equal_each_document_alone(self, name):
    cfg = tiny_model_config(**_SMALL_CHUNKS)
    layer = MIXERS[name].build(cfg, cfg[MIXERS[name].section], nnx.Rngs(1))
    rng = np.random.default_rng(0)
    lengths = (5, 3, 6)
    docs = [jnp.asarray(rng.normal(size=(1, n, cfg.width)), jnp.float32) for n in lengths]
    segment_ids = jnp.asarray([sum(([i] * n for i, n in enumerate(lengths)), [])])
    positions = jnp.asarray([sum((list(range(n)) for n in lengths), [])])  # restart per document

    @jax.jit
    def run(x, positions, segment_ids):
      return layer(x, positions=positions, segment_ids=segment_ids)[0]

    packed = run(jnp.concatenate(docs, axis=1), positions, segment_ids)
    alone = [run(d, jnp.arange(d.shape[1])[None], None) for d in docs]
    np.testing.assert_allclose(packed, jnp.concatenate(alone, axis=1), atol=2e-5, rtol=2e-5)


class TrainTest(parameterized.TestCase):

  @parameterized.parameters(*RECURRENT, HYBRID)
  def test_loss_finite_and_falling(self, mixers):
    losses, _, _ = train_on_counting({"model.mixers": mixers,
                                      "model.num_layers": len(mixers.split(","))}, length=24)
    self.assertTrue(np.isfinite(losses).all(), losses)
    self.assertLess(np.mean(losses[-3:]), losses[0] - 0.3, losses)

  def test_quickstart_trains_evaluates_and_generates(self):
    # configs/quickstart.py:tiny with --config.model.mixers=<every recurrent mixer, one layer
    # each> --config.train.steps=8: one run (one compiled model, ~25 s) instead of one per mixer
    # (~10 s each); each mixer alone is covered by the decode and training cases above.
    workdir = self.create_tempdir().full_path + "/run"
    cfg = testing.tiny_config(**{"model.mixers": ",".join(RECURRENT),
                                 "model.num_layers": len(RECURRENT), "train.steps": 8,
                                 "eval.lengths": "1x"})
    result = experiment.train_and_evaluate(cfg, workdir, progress=False)
    self.assertFalse(result.interrupted)
    run = runs.load_run(workdir)
    prompt = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 5)), jnp.int32)
    tokens = generate(run.graphdef, run.params, prompt, jax.random.key(0), max_new_tokens=6)
    # Greedy decoding through the states picks what a full forward pass ranks first (up to ties
    # within rounding).
    logits, _ = _forward(run.graphdef, run.params, tokens[:, :-1])
    logits = np.asarray(logits[:, 4:])
    picked = np.take_along_axis(logits, np.asarray(tokens[:, 5:, None]), axis=-1)[..., 0]
    np.testing.assert_allclose(picked, logits.max(axis=-1), atol=1e-4, rtol=0)


if __name__ == "__main__":
  absltest.main()
