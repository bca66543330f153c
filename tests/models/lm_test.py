"""DecoderLM: prefill == token-by-token decode, scanned structure, generation, errors."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from configs import quickstart
from longjax.layers.positional import POSENCS
from longjax.models import build_model
from longjax.models.generate import generate, sample_logits
from tests import testing

# Max |logit difference| allowed between two computation orders of the same model.
TOLERANCE = {"float32": 5e-5, "bfloat16": 6e-2}


def tiny_model_config(**overrides):
  c = quickstart.get_config("tiny").model
  c.num_layers = 2
  c.width = 32
  c.num_heads = 4
  c.mlp_hidden = 48
  return testing.apply_overrides(c, overrides)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens, positions=None, cache=None):
  return nnx.merge(graphdef, params)(tokens, positions=positions, cache=cache)


def decode_one_by_one(graphdef, params, tokens, cache):
  """Feeds `tokens` [B, T] through the cache one token at a time: ([B, T, V] logits, cache)."""
  steps = []
  for t in range(tokens.shape[1]):
    logits, cache = _forward(graphdef, params, tokens[:, t:t + 1], None, cache)
    steps.append(logits)
  return jnp.concatenate(steps, axis=1), cache


class DecodeTest(parameterized.TestCase):

  @parameterized.parameters(
      ("rope", 4), ("rope", 2), ("rope", 1), ("alibi", 2), ("nope", 4), ("sinusoidal", 1),
      ("learned", 2))
  def test_prefill_equals_token_by_token_decode(self, posenc, kv_heads):
    cfg = tiny_model_config(**{"posenc.kind": posenc, "num_kv_heads": kv_heads})
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 11)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    decoded, _ = decode_one_by_one(graphdef, params, tokens, model.init_cache(2, 16))
    np.testing.assert_allclose(decoded, full, atol=TOLERANCE["float32"], rtol=0)

  @parameterized.parameters("float32", "bfloat16")
  def test_chunked_prefill_then_decode(self, dtype):
    # A prompt of 7 in one call, then 3 single tokens: same logits as one full pass.
    cfg = tiny_model_config(dtype=dtype)
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 50, (3, 10)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    cache = model.init_cache(3, 10)
    first, cache = _forward(graphdef, params, tokens[:, :7], None, cache)
    rest, cache = decode_one_by_one(graphdef, params, tokens[:, 7:], cache)
    np.testing.assert_allclose(jnp.concatenate([first, rest], axis=1), full,
                               atol=TOLERANCE[dtype], rtol=0)
    self.assertEqual(int(cache[0].end), 10)

  def test_sliding_window_prefill_equals_decode_and_limits_context(self):
    cfg = tiny_model_config(**{"attention.window": 4})
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 50, (2, 12)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    decoded, _ = decode_one_by_one(graphdef, params, tokens, model.init_cache(2, 12))
    np.testing.assert_allclose(decoded, full, atol=TOLERANCE["float32"], rtol=0)
    # With 2 layers of window 4 the last token's receptive field starts at token 12 - 2*3 - 1:
    # changing token 0 cannot change the last logits.
    changed = tokens.at[:, 0].set((tokens[:, 0] + 1) % 50)
    np.testing.assert_allclose(_forward(graphdef, params, changed)[0][:, -1], full[:, -1],
                               atol=TOLERANCE["float32"])

  def test_per_layer_overrides_apply_to_their_layer_only(self):
    # "attention(window=4),attention": layer 0 slides, layer 1 sees everything. The same
    # parameters under other two-entry patterns give independent references.
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, 50, (2, 12)), jnp.int32)
    mixed_model = build_model(tiny_model_config(mixers="attention(window=4),attention"),
                              vocab_size=50, rngs=nnx.Rngs(3))
    graphdef, params = nnx.split(mixed_model)
    self.assertEqual([b.mixer.window for b in mixed_model.groups], [4, None])

    def logits_with(mixers, **overrides):
      model = build_model(tiny_model_config(mixers=mixers, **overrides), vocab_size=50,
                          rngs=nnx.Rngs(0))
      return _forward(nnx.graphdef(model), params, tokens)[0]

    mixed = _forward(graphdef, params, tokens)[0]
    decoded, _ = decode_one_by_one(graphdef, params, tokens, mixed_model.init_cache(2, 12))
    np.testing.assert_allclose(decoded, mixed, atol=TOLERANCE["float32"], rtol=0)
    tol = TOLERANCE["float32"]
    # Within the window the slide changes nothing; beyond it, only the mixed pattern gives it.
    np.testing.assert_allclose(mixed[:, :4], logits_with("attention,attention")[:, :4], atol=tol)
    for other in (logits_with("attention,attention"), logits_with("attention,attention(window=4)")):
      self.assertGreater(float(jnp.max(jnp.abs(mixed[:, 4:] - other[:, 4:]))), 100 * tol)
    # An override on every layer equals the shared section's field.
    np.testing.assert_allclose(
        logits_with("attention(window=4),attention(window=4)"),
        logits_with("attention,attention", **{"attention.window": 4}), atol=tol, rtol=0)

  @parameterized.parameters("rope", "alibi", "nope")
  def test_streaming_sink_cache_equals_attention_on_kept_tokens(self, posenc):
    # One layer, so every cached key/value is a function of its token alone: at step t the
    # streaming cache must give the logits of a plain forward pass over the kept tokens (2 sinks
    # and the last 4) at positions 0..n-1, which is StreamingLLM's definition.
    sinks, window, length = 2, 4, 12
    overrides = {"posenc.kind": posenc, "num_layers": 1}
    streaming = build_model(tiny_model_config(**overrides, **{
        "attention.window": window, "attention.sink_tokens": sinks}), vocab_size=50,
                            rngs=nnx.Rngs(6))
    plain = build_model(tiny_model_config(**overrides), vocab_size=50, rngs=nnx.Rngs(6))
    graphdef, params = nnx.split(streaming)
    plain_graphdef, _ = nnx.split(plain)
    tokens = jnp.asarray(np.random.RandomState(6).randint(0, 50, (2, length)), jnp.int32)

    cache = streaming.init_cache(2, length)
    self.assertEqual(cache[0].k.shape[1], sinks + window)  # O(sinks + window) memory
    first, cache = _forward(graphdef, params, tokens[:, :7], None, cache)  # chunked prefill
    steps = [first]
    for t in range(7, length):
      logits, cache = _forward(graphdef, params, tokens[:, t:t + 1], None, cache)
      steps.append(logits)
    streamed = jnp.concatenate(steps, axis=1)
    for t in range(length):
      kept = list(range(min(sinks, t + 1))) + list(range(max(sinks, t - window + 1), t + 1))
      expected, _ = _forward(plain_graphdef, params, tokens[:, kept])
      np.testing.assert_allclose(streamed[:, t], expected[:, -1], atol=TOLERANCE["float32"],
                                 err_msg=f"step {t}")

  def test_segment_ids_isolate_documents(self):
    # Two documents packed in one row give the same logits as each document alone.
    cfg = tiny_model_config()
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(2))
    rng = np.random.RandomState(2)
    a, b = rng.randint(0, 50, (1, 6)), rng.randint(0, 50, (1, 5))
    packed = jnp.asarray(np.concatenate([a, b], axis=1), jnp.int32)
    segments = jnp.asarray([[1] * 6 + [2] * 5], jnp.int32)
    positions = jnp.asarray([list(range(6)) + list(range(5))], jnp.int32)
    logits, _ = model(packed, positions=positions, segment_ids=segments)
    alone_a, _ = model(jnp.asarray(a, jnp.int32))
    alone_b, _ = model(jnp.asarray(b, jnp.int32))
    np.testing.assert_allclose(logits[:, :6], alone_a, atol=TOLERANCE["float32"])
    np.testing.assert_allclose(logits[:, 6:], alone_b, atol=TOLERANCE["float32"])


  @parameterized.parameters(("reference", 0, 4), ("blockwise", 0, 2), ("blockwise", 5, 2))
  def test_softplus_reweighted_prefill_equals_token_by_token_decode(self, impl, window, kv_heads):
    # LSSAR (arXiv 2501.13428): the length scale and the re-weighting use each query's number
    # of visible keys, which decoding must count from the cache exactly as the prefill does.
    cfg = tiny_model_config(**{"attention.normalizer": "softplus",
                               "attention.reweight_power": 15.0, "attention.impl": impl,
                               "attention.block_size": 4, "attention.window": window,
                               "num_kv_heads": kv_heads})
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(7))
    graphdef, params = nnx.split(model)
    tokens = jnp.asarray(np.random.RandomState(7).randint(0, 50, (2, 11)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    decoded, _ = decode_one_by_one(graphdef, params, tokens, model.init_cache(2, 16))
    np.testing.assert_allclose(decoded, full, atol=TOLERANCE["float32"], rtol=0)
    # Re-weighting is active: the same parameters without it give other logits.
    plain = build_model(tiny_model_config(**{"attention.normalizer": "softplus",
                                             "attention.window": window,
                                             "num_kv_heads": kv_heads}),
                        vocab_size=50, rngs=nnx.Rngs(7))
    plain_graphdef, _ = nnx.split(plain)
    self.assertGreater(float(jnp.abs(_forward(plain_graphdef, params, tokens)[0] - full).max()),
                       1e-3)


class StructureTest(parameterized.TestCase):

  @parameterized.parameters(*POSENCS)
  def test_state_holds_only_parameters(self, kind):
    # A bare array attribute (e.g. fixed ALiBi slopes) would join the state and be trained.
    cfg = tiny_model_config(**{"posenc.kind": kind, "posenc.original_length": 16})
    state = nnx.state(build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    self.assertTrue(all(isinstance(leaf, nnx.Param) for leaf in leaves),
                    [type(leaf) for leaf in leaves])

  def test_layers_are_stacked_for_scan(self):
    cfg = tiny_model_config(num_layers=6)
    model = build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))
    w_q = model.groups[0].mixer.w_q
    self.assertEqual(w_q.shape[0], 6)
    self.assertEqual(w_q.get_metadata()["out_sharding"][0], "layers")
    # Layers are initialised independently, not copies of one another.
    self.assertFalse(np.allclose(w_q.value[0], w_q.value[1]))

  @parameterized.parameters(("none", False), ("full", True), ("dots", True),
                            ("dots_no_batch", True))
  def test_remat_policies_and_unrolled_layers_give_same_gradients(self, remat, scan_layers):
    tokens = jnp.asarray(np.random.RandomState(3).randint(0, 50, (2, 8)), jnp.int32)

    def loss_and_grads(**overrides):
      # Three layers: the unrolled loop's parameter slices and the scan's must line up.
      model = build_model(tiny_model_config(num_layers=3, **overrides), vocab_size=50,
                          rngs=nnx.Rngs(0))
      graphdef, params = nnx.split(model)

      def loss(p):
        logits, _ = nnx.merge(graphdef, p)(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

      return jax.jit(jax.value_and_grad(loss))(params)

    # f32: the same operations in the same order up to XLA's fusion choices.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 loss_and_grads(remat="none", scan_layers=True),
                 loss_and_grads(remat=remat, scan_layers=scan_layers))

  def test_mlp_hidden_zero_gives_mixer_only_layers(self):
    # Mamba's own LMs: each layer is x + mixer(norm(x)) alone.
    model = build_model(tiny_model_config(mlp_hidden=0, num_layers=2), vocab_size=50,
                        rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, 50, (1, 6)), jnp.int32)
    logits, _ = model(tokens)
    x = jnp.take(model.embed.value, tokens, axis=0)
    positions = jnp.arange(6)[None]
    graphdef, state = nnx.split(model.groups)
    for g in range(2):
      (block,) = nnx.merge(graphdef, jax.tree.map(lambda a, g=g: a[g], state))
      self.assertIsNone(block.mlp)
      x = x + block.mixer(block.mixer_norm(x), positions=positions)[0]
    want = model.final_norm(x) @ model.head.value
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-5)

  def test_tied_embeddings_have_no_head(self):
    model = build_model(tiny_model_config(tie_embeddings=True), vocab_size=50,
                        rngs=nnx.Rngs(0))
    self.assertIsNone(model.head)
    logits, _ = model(jnp.zeros((1, 3), jnp.int32))
    self.assertEqual(logits.shape, (1, 3, 50))

  def test_bad_pattern_and_depth(self):
    with self.assertRaisesRegex(ValueError, "unknown mixer 'hyena'.*valid: attention"):
      build_model(tiny_model_config(mixers="attn,hyena"), vocab_size=50, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "num_layers=3 is not a multiple"):
      build_model(tiny_model_config(mixers="attn,attn", num_layers=3), vocab_size=50,
                  rngs=nnx.Rngs(0))


class GenerateTest(absltest.TestCase):

  def test_greedy_matches_repeated_full_forward(self):
    # Independent of the cache: re-run the whole sequence each step and take the argmax.
    model = build_model(tiny_model_config(), vocab_size=50, rngs=nnx.Rngs(4))
    graphdef, params = nnx.split(model)
    prompt = jnp.asarray(np.random.RandomState(4).randint(0, 50, (2, 5)), jnp.int32)
    out = generate(graphdef, params, prompt, jax.random.key(0), max_new_tokens=6)
    # One compiled length: the causal model's logits at i ignore the zeros after i.
    seq = jnp.zeros((2, 11), jnp.int32).at[:, :5].set(prompt)
    for i in range(5, 11):
      logits, _ = _forward(graphdef, params, seq)
      seq = seq.at[:, i].set(jnp.argmax(logits[:, i - 1], -1).astype(jnp.int32))
    np.testing.assert_array_equal(out, seq)

  def test_top_k_samples_only_top_k(self):
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    picks = {int(sample_logits(logits, jax.random.key(i), temperature=1.0, top_k=2)[0])
             for i in range(200)}
    self.assertEqual(picks, {0, 1})

  def test_sampling_is_seeded(self):
    model = build_model(tiny_model_config(), vocab_size=50, rngs=nnx.Rngs(5))
    graphdef, params = nnx.split(model)
    prompt = jnp.zeros((1, 3), jnp.int32)
    a = generate(graphdef, params, prompt, jax.random.key(7), max_new_tokens=8, temperature=1.0)
    b = generate(graphdef, params, prompt, jax.random.key(7), max_new_tokens=8, temperature=1.0)
    c = generate(graphdef, params, prompt, jax.random.key(8), max_new_tokens=8, temperature=1.0)
    np.testing.assert_array_equal(a, b)
    self.assertFalse(np.array_equal(a, c))


if __name__ == "__main__":
  absltest.main()
