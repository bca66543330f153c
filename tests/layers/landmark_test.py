"""Landmark attention: the landmark layout against hand-worked rows, the grouped softmax in XLA
against the kernels' dense reference (forward and gradients) and, with packed documents,
against float64 numpy written from the definition; top-k retrieval against numpy restricted to
the blocks numpy selects, and the selection on hand-made keys; then the model: decoding through
the cache and prefill == the full forward pass when every block is retrieved, training, the
quickstart (train, evaluate with retrieval, generate), and the config errors.

Tolerances: float32 throughout, 2e-5 absolute on O(1) outputs (sums of a few dozen terms)."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.landmark import landmark_attention_reference
from longjax import configuration
from longjax import experiment
from longjax import runs
from longjax.models import MIXERS
from longjax.models import build_model
from longjax.models.generate import generate
from longjax.ops import landmark_attention as ops
from longjax.ops import landmarks
from tests import testing
from tests.models.learned_bias_model_test import train_on_counting
from tests.models.lm_test import _forward
from tests.models.lm_test import decode_one_by_one
from tests.models.lm_test import tiny_model_config

ATOL = 2e-5


def _no_rotation(x, positions, is_key):
  del positions, is_key
  return x


def _qkv(b, t, n, k, h, seed=0):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((b, t, n, h), (b, t, k, h), (b, t, k, h)))


def _numpy_grouped(q, k, v, block, segment_ids=None, blocks_of=None):
  """Landmark attention from its definition, float64, one query at a time.

  The main softmax runs over the query's own block's regular keys j <= i and the landmarks of
  the earlier blocks it may use (`blocks_of(b, i, head)`, default all earlier ones); a regular
  key of such a block gets its landmark's main weight times the block's own softmax. With
  segment ids a query sees keys of its own document only (and a block only if it holds one of
  its document's tokens, which the model's layout guarantees when it sees the landmark).
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b_, t, n, h = q.shape
  group = n // k.shape[2]
  out = np.zeros(q.shape)
  for b in range(b_):
    for i in range(t):
      for head in range(n):
        kh = head // group
        x = k[b, :, kh] @ q[b, i, head] / np.sqrt(h)
        same = (np.ones(t, bool) if segment_ids is None
                else np.asarray(segment_ids[b]) == segment_ids[b][i])
        own = i // block
        earlier = range(own) if blocks_of is None else blocks_of(b, i, head)
        main = {j: x[j] for j in range(own * block, i + 1) if (j + 1) % block and same[j]}
        main.update({("L", g): x[g * block + block - 1] for g in earlier
                     if same[g * block + block - 1] and same[g * block:(g + 1) * block - 1].any()})
        if not main:  # e.g. a landmark whose block holds no token of its document: zeros
          continue
        top = max(main.values())
        total = sum(np.exp(z - top) for z in main.values())
        for key, z in main.items():
          weight = np.exp(z - top) / total
          if not isinstance(key, tuple):
            out[b, i, head] += weight * v[b, key, kh]
            continue
          g = key[1]
          members = [j for j in range(g * block, g * block + block - 1) if same[j]]
          inner = np.exp(x[members] - x[members].max())
          out[b, i, head] += weight * (inner / inner.sum()) @ v[b, members, kh]
  return out


class LayoutTest(parameterized.TestCase):

  @parameterized.parameters((12, 4), (11, 4), (3, 4), (7, 2))
  def test_insert_then_remove_round_trips(self, length, block):
    x = jnp.arange(2 * length).reshape(2, length) + 1
    inserted = landmarks.insert_landmarks(x, -1, block)
    self.assertEqual(inserted.shape[1], landmarks.landmarked_length(length, block))
    np.testing.assert_array_equal(
        np.asarray(inserted[0]) == -1, landmarks.is_landmark(inserted.shape[1], block))
    np.testing.assert_array_equal(landmarks.remove_landmarks(inserted, block, length), x)

  def test_positions_and_documents_of_a_packed_row(self):
    # Blocks of 3 (2 tokens + landmark); documents of 3 and 4 tokens, positions restarting.
    positions = jnp.asarray([[0, 1, 2, 0, 1, 2, 3]])
    segments = jnp.asarray([[0, 0, 0, 1, 1, 1, 1]])
    new_positions, new_segments = landmarks.landmark_layout(positions, segments, 3)
    # Row: t t L t t L t t L t. A landmark belongs to the token before it (the second one to
    # document 1, whose first token it follows), and positions count landmarks from the
    # document's start only.
    np.testing.assert_array_equal(new_positions, [[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    np.testing.assert_array_equal(new_segments, [[0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])

  def test_positions_count_landmarks_from_the_document_start(self):
    positions = jnp.asarray([[5, 6, 7, 8, 9]])  # one document starting mid-stream
    new_positions, new_segments = landmarks.landmark_layout(positions, None, 3)
    self.assertIsNone(new_segments)
    np.testing.assert_array_equal(new_positions, [[5, 6, 7, 8, 9, 10, 11]])


class GroupedSoftmaxTest(parameterized.TestCase):

  @parameterized.parameters((37, 5, 4, 2), (16, 4, 2, 2))
  def test_equals_the_kernel_reference_forward_and_backward(self, t, block, n, k):
    q, k_, v = _qkv(2, t, n, k, 8)
    weights = jnp.sin(jnp.arange(8.0))

    def grads(fn):  # (output, dq, dk, dv), one compiled program per side
      loss = lambda *a: (fn(*a) * weights).sum()
      return jax.jit(lambda *a: (fn(*a), *jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, k_, v)

    for got, want in zip(
        grads(lambda *a: ops.grouped_softmax_attention(*a, block=block)),
        grads(lambda *a: landmark_attention_reference(*a, landmark_block=block))):
      np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)

  @parameterized.parameters("xla", "pallas")
  def test_packed_documents_follow_the_definition(self, impl):
    q, k, v = _qkv(1, 14, 2, 1, 4, seed=1)
    segments = jnp.asarray([[0] * 5 + [1] * 6 + [2] * 3])
    got = ops.landmark_attention(q, k, v, block=4, segment_ids=segments, impl=impl)
    np.testing.assert_allclose(got, _numpy_grouped(q, k, v, 4, segments), atol=ATOL, rtol=0)


class RetrievalTest(parameterized.TestCase):

  def test_top_k_follows_the_definition_on_the_chosen_blocks(self):
    # Without positions (NoPE) the retrieval layout changes nothing, so top-k retrieval is the
    # grouped softmax over the query's own block and the k blocks whose landmarks it scores
    # highest, per head (chosen here in numpy).
    b, t, n, h, block, top = 2, 29, 4, 4, 4, 2
    q, k, v = _qkv(b, t, n, 2, h, seed=2)
    qn, kn = np.asarray(q), np.asarray(k)

    def blocks_of(row, i, head):
      scores = [kn[row, g * block + block - 1, head // 2] @ qn[row, i, head]
                for g in range(i // block)]
      return sorted(np.argsort(scores)[::-1][:top])

    pad = [(0, 0), (0, 32 - t), (0, 0), (0, 0)]  # the cache: whole blocks
    k_cache, v_cache = jnp.pad(k, pad), jnp.pad(v, pad)
    landmarks_ = k_cache.reshape(b, 32 // block, block, 2, h)[:, :, -1].transpose(0, 2, 1, 3)
    got = ops.retrieval_attention(q, k_cache, v_cache, landmarks_, jnp.arange(t), block=block,
                                  top_k=top, rotate=_no_rotation)
    np.testing.assert_allclose(got, _numpy_grouped(q, k, v, block, blocks_of=blocks_of),
                               atol=ATOL, rtol=0)

  def test_the_block_holding_the_matching_key_is_selected(self):
    # Six complete blocks whose landmark keys are orthogonal directions; each query matches one.
    h, blocks = 8, 6
    landmark_keys = jnp.eye(h)[:blocks][None, None] * 4.0  # [1, K=1, G, H]
    q = jnp.eye(h)[jnp.asarray([4, 1, 5])][None, :, None, :]  # [1, T=3, N=1, H]
    ids, valid = ops.select_blocks(q, landmark_keys, jnp.asarray([6, 6, 5]), jnp.zeros(3, int),
                                   top_k=1, block=4, rotate=_no_rotation)
    np.testing.assert_array_equal(ids[0, :, 0, 0], [4, 1, 0])
    # The third query may only use blocks 0-4, so block 5's match does not count; all its
    # scores tie at 0 and it keeps a valid (earliest) one.
    np.testing.assert_array_equal(valid[0, :, 0, 0], [True, True, True])

  def test_fewer_candidates_than_k_are_marked_invalid(self):
    landmark_keys = jnp.ones((1, 1, 4, 2))
    ids, valid = ops.select_blocks(jnp.ones((1, 2, 1, 2)), landmark_keys, jnp.asarray([1, 0]),
                                   jnp.zeros(2, int), top_k=3, block=4, rotate=_no_rotation)
    np.testing.assert_array_equal(valid[0, :, 0], [[True, False, False], [False] * 3])
    self.assertEqual(int(ids[0, 0, 0, 0]), 0)


class ModelTest(parameterized.TestCase):

  def _model(self, **overrides):
    cfg = tiny_model_config(**{"mixers": "landmark", "landmark.block_size": 4,
                               "num_kv_heads": 2, **overrides})
    configuration.validate_model(cfg)
    return build_model(cfg, vocab_size=50, rngs=nnx.Rngs(0))

  # Alone, and in hybrids whose other layers (a KV cache, an SSM state) also see the landmarks.
  @parameterized.parameters("landmark", "landmark,attention", "landmark,mamba")
  def test_prefill_and_decode_equal_the_forward_pass_when_every_block_is_retrieved(self, mixers):
    # k >= the number of blocks: retrieval keeps every block at its true distance, so decoding
    # (one token at a time, landmarks run when a block completes) is the training forward pass.
    graphdef, params = nnx.split(self._model(**{"landmark.top_k": 8, "mixers": mixers}))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 50, (2, 14)), jnp.int32)
    full, _ = _forward(graphdef, params, tokens)
    model = nnx.merge(graphdef, params)
    # A prompt of 6 tokens (two whole blocks with their landmarks), then one at a time.
    prefix, cache = _forward(graphdef, params, tokens[:, :6], None, model.init_cache(2, 14))
    self.assertEqual(int(cache[0].end), 8)
    rest, cache = decode_one_by_one(graphdef, params, tokens[:, 6:], cache)
    np.testing.assert_allclose(jnp.concatenate([prefix, rest], axis=1), full, atol=ATOL, rtol=0)
    self.assertEqual(int(cache[0].end), landmarks.landmarked_length(14, 4))

  def test_pallas_training_form_equals_xla(self):
    cfg = tiny_model_config(**{"landmark.block_size": 4, "num_kv_heads": 2})
    layer = MIXERS["landmark"].build(cfg, cfg.landmark, nnx.Rngs(1))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 13, 32)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(13), (2, 13))
    want, _ = layer(x, positions=positions)
    layer.impl = "pallas"  # interpreted on CPU
    np.testing.assert_allclose(layer(x, positions=positions)[0], want, atol=ATOL, rtol=0)

  def test_a_prefill_off_a_block_boundary_is_nan_not_wrong(self):
    graphdef, params = nnx.split(self._model())
    tokens = jnp.zeros((1, 4), jnp.int32)
    _, cache = _forward(graphdef, params, tokens[:, :1], None,
                        nnx.merge(graphdef, params).init_cache(1, 8))
    logits, _ = _forward(graphdef, params, tokens[:, 1:], None, cache)
    self.assertTrue(np.isnan(logits).all())

  def test_loss_finite_and_falling(self):
    losses, _, _ = train_on_counting({"model.mixers": "landmark",
                                      "model.landmark.block_size": 5}, length=24)
    self.assertTrue(np.isfinite(losses).all(), losses)
    self.assertLess(np.mean(losses[-3:]), losses[0] - 0.3, losses)

  def test_quickstart_trains_evaluates_and_generates(self):
    # configs/quickstart.py:tiny with --config.model.mixers=landmark and no other model flag.
    workdir = self.create_tempdir().full_path + "/run"
    cfg = testing.tiny_config(**{"model.mixers": "landmark", "model.landmark.block_size": 8,
                                 "train.steps": 6, "eval.lengths": "2x"})
    result = experiment.train_and_evaluate(cfg, workdir, progress=False)
    self.assertFalse(result.interrupted)
    run = runs.load_run(workdir)
    prompt = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 7)), jnp.int32)
    tokens = generate(run.graphdef, run.params, prompt, jax.random.key(0), max_new_tokens=9)
    # Greedy decoding picks what a prefill through the same retrieval ranks first.
    model = nnx.merge(run.graphdef, run.params)
    logits, _ = _forward(run.graphdef, run.params, tokens[:, :-1], None,
                         model.init_cache(2, tokens.shape[1]))
    logits = np.asarray(logits[:, 6:])
    picked = np.take_along_axis(logits, np.asarray(tokens[:, 7:, None]), axis=-1)[..., 0]
    np.testing.assert_allclose(picked, logits.max(axis=-1), atol=1e-4, rtol=0)


class ConfigTest(parameterized.TestCase):

  @parameterized.parameters(
      ({"landmark.top_k": 0}, "model.landmark.top_k"),
      ({"landmark.block_size": 1}, "model.landmark.block_size"),
      ({"landmark.impl": "splash"}, "model.landmark.impl"),
      ({"posenc.kind": "alibi"}, "model.posenc.kind"),
      ({"posenc.scaling": "dynamic_ntk", "posenc.original_length": 64}, "model.posenc.scaling"),
      ({"mixers": "landmark,landmark(block_size=8)", "num_layers": 2}, "same block_size"),
  )
  def test_bad_fields_are_named(self, overrides, message):
    cfg = tiny_model_config(**{"mixers": "landmark", **overrides})
    with self.assertRaisesRegex(configuration.ConfigError, message):
      configuration.validate_model(cfg)


if __name__ == "__main__":
  absltest.main()
