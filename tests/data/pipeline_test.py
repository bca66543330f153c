"""Tests for longjax.data.pipeline: packing against a brute-force model, sharding, resume."""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import grain
import numpy as np
import orbax.checkpoint as ocp

from longjax.data import pipeline
from longjax.data import tokenizers
from longjax.data.builders import text_dir

_SEQ_LEN = 16
_BATCH = 3


def _documents(n=13, seed=0):
  """Texts of very different lengths: empty, shorter than a row, several rows long."""
  rng = np.random.default_rng(seed)
  alphabet = list('abcdefgh é😀\n')
  lengths = [0, 1, 70] + list(rng.integers(0, 40, size=n - 3))
  return [f'{i}:' + ''.join(rng.choice(alphabet, size=k)) for i, k in enumerate(lengths)]


def _source(texts):
  return [{'text': t} for t in texts]


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _rows(batches):
  """The packed rows of T + 1 tokens, [R, T + 1], recovered from shifted batches."""
  return np.concatenate(
      [np.concatenate([b['inputs'], b['targets'][:, -1:]], axis=1) for b in batches])


def _parse_stream(stream, tok):
  """Splits a token stream at BOS into documents; returns texts and per-token doc numbers."""
  starts = np.flatnonzero(stream == tok.bos_id)
  assert starts[0] == 0, 'the stream must start with a document'
  ends = list(starts[1:]) + [len(stream)]
  texts, complete = [], []
  occurrence = np.zeros(len(stream), np.int64)
  for k, (s, e) in enumerate(zip(starts, ends)):
    occurrence[s:e] = k
    texts.append(tok.decode(stream[s:e]))
    complete.append(stream[e - 1] == tok.eos_id)
  return texts, complete, occurrence


class LmExampleTest(absltest.TestCase):

  def test_padding_and_boundaries(self):
    row = {
        'tokens': np.array([1, 5, 6, 2, 1, 7, 0, 0]),
        'tokens_segment_ids': np.array([1, 1, 1, 1, 2, 2, 0, 0]),
        'tokens_positions': np.array([0, 1, 2, 3, 0, 1, 0, 0]),
    }
    ex = pipeline.lm_example(row)
    np.testing.assert_array_equal(ex['inputs'], [1, 5, 6, 2, 1, 7, 0])
    np.testing.assert_array_equal(ex['targets'], [5, 6, 2, 1, 7, 0, 0])
    np.testing.assert_array_equal(ex['segment_ids'], [1, 1, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(ex['positions'], [0, 1, 2, 3, 0, 1, 0])
    np.testing.assert_array_equal(ex['weights'], [1, 1, 1, 0, 1, 0, 0])
    self.assertEqual(ex['weights'].dtype, np.float32)
    self.assertEqual(ex['inputs'].dtype, np.int32)


class TrainIteratorTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tok = tokenizers.ByteTokenizer()
    self.texts = _documents()

  def _iterator(self, seed=0, shard_index=0, shard_count=1, texts=None, shuffle_window=1):
    # shuffle_window=1 keeps rows in packed order, which the stream reconstructions need.
    return pipeline.make_train_iterator(
        data_source=_source(texts or self.texts), tokenizer=self.tok, seq_len=_SEQ_LEN,
        batch_size=_BATCH, seed=seed, shard_index=shard_index, shard_count=shard_count,
        shuffle_window=shuffle_window)

  def test_row_shuffle_permutes_rows_within_windows(self):
    window = 6  # rows; a multiple of the batch size so windows align with batches
    packed = _rows(_take(self._iterator(), 2 * window // _BATCH))
    shuffled = _rows(_take(self._iterator(shuffle_window=window), 2 * window // _BATCH))
    self.assertFalse(np.array_equal(packed, shuffled))
    for w in range(2):
      block = slice(w * window, (w + 1) * window)
      self.assertCountEqual([r.tobytes() for r in packed[block]],
                            [r.tobytes() for r in shuffled[block]])

  def test_shapes_and_dtypes(self):
    batch = next(self._iterator())
    for key in ('inputs', 'targets', 'segment_ids', 'positions'):
      self.assertEqual(batch[key].shape, (_BATCH, _SEQ_LEN))
      self.assertEqual(batch[key].dtype, np.int32)
    self.assertEqual(batch['weights'].dtype, np.float32)

  def test_packing_matches_brute_force_over_three_epochs(self):
    total = sum(len(t.encode()) + 2 for t in self.texts)
    n_batches = 3 * total // (_BATCH * (_SEQ_LEN + 1)) + 1
    batches = _take(self._iterator(), n_batches)
    rows = _rows(batches)
    stream = rows.reshape(-1)
    texts, complete, occurrence = _parse_stream(stream, self.tok)

    # Nothing lost or duplicated: each epoch is a permutation of all documents, re-shuffled.
    n = len(self.texts)
    self.assertGreaterEqual(len(texts), 3 * n)
    epochs = [texts[e * n:(e + 1) * n] for e in range(3)]
    for epoch in epochs:
      self.assertCountEqual(epoch, self.texts)
    self.assertNotEqual(epochs[0], epochs[1])
    self.assertNotEqual(epochs[0], self.texts)
    # And the stream is exactly the concatenation of [BOS] + bytes + [EOS] of those documents.
    expected = np.concatenate([[1, *self.tok.encode(t), 2] for t in texts[:-1]])
    np.testing.assert_array_equal(stream[:len(expected)], expected)
    self.assertTrue(all(complete[:-1]))

    # Per row: segments number the document pieces 1, 2, ...; positions restart at each piece;
    # a weight is 1 exactly where input and target belong to the same piece.
    occurrence = occurrence.reshape(rows.shape)
    inputs = np.concatenate([b['inputs'] for b in batches])
    segment_ids = np.concatenate([b['segment_ids'] for b in batches])
    positions = np.concatenate([b['positions'] for b in batches])
    weights = np.concatenate([b['weights'] for b in batches])
    targets = np.concatenate([b['targets'] for b in batches])
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
    for r in range(len(rows)):
      occ = occurrence[r]
      seg = np.cumsum(np.concatenate([[1], occ[1:] != occ[:-1]]))
      pos = np.zeros_like(occ)
      for t in range(1, len(occ)):
        pos[t] = pos[t - 1] + 1 if occ[t] == occ[t - 1] else 0
      np.testing.assert_array_equal(segment_ids[r], seg[:-1])
      np.testing.assert_array_equal(positions[r], pos[:-1])
      np.testing.assert_array_equal(weights[r], (occ[1:] == occ[:-1]).astype(np.float32))
    # The 70-character document spans rows, so some row must start inside a document.
    self.assertTrue(np.any(rows[:, 0] != self.tok.bos_id))
    self.assertTrue(np.all(segment_ids > 0))  # an endless stream never pads

  def test_same_seed_same_batches_other_seed_other_batches(self):
    a, b, c = (_take(self._iterator(seed=s), 4) for s in (7, 7, 8))
    np.testing.assert_array_equal(_rows(a), _rows(b))
    self.assertFalse(np.array_equal(_rows(a), _rows(c)))

  def test_shards_read_disjoint_documents(self):
    seen = []
    for shard in range(2):
      rows = _rows(_take(self._iterator(shard_index=shard, shard_count=2), 8))
      texts, complete, _ = _parse_stream(rows.reshape(-1), self.tok)
      seen.append({t for t, c in zip(texts, complete) if c})
    self.assertEmpty(seen[0] & seen[1])
    self.assertEqual(seen[0] | seen[1], set(self.texts))

  def test_bad_shard_arguments(self):
    with self.assertRaises(ValueError):
      self._iterator(shard_index=2, shard_count=2)
    with self.assertRaisesRegex(ValueError, 'no documents'):
      self._iterator(shard_index=3, shard_count=4, texts=self.texts[:2])

  @parameterized.product(steps=(0, 1, 2, 5, 11), shuffle_window=(1, 5))
  def test_state_round_trip_through_json(self, steps, shuffle_window):
    reference = self._iterator(shuffle_window=shuffle_window)
    expected = _take(reference, steps + 3)[steps:]
    it = self._iterator(shuffle_window=shuffle_window)
    _take(it, steps)
    state = json.loads(json.dumps(it.get_state()))  # what grain's orbax handler stores
    _take(it, 2)  # the restored iterator must not depend on this one's later progress
    fresh = self._iterator(shuffle_window=shuffle_window)
    fresh.set_state(state)
    for got, want in zip(_take(fresh, 3), expected):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)

  @parameterized.parameters(0, 4)  # at 0 no document is half-consumed, at 4 one is
  def test_orbax_checkpoint_manager_round_trip(self, steps):
    reference = self._iterator()
    expected = _take(reference, steps + 3)[steps:]
    it = self._iterator()
    _take(it, steps)
    with tempfile.TemporaryDirectory() as tmp:
      with ocp.CheckpointManager(os.path.join(tmp, 'ckpt')) as manager:
        manager.save(steps, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
      _take(it, 2)
      fresh = self._iterator()
      with ocp.CheckpointManager(os.path.join(tmp, 'ckpt')) as manager:
        self.assertEqual(manager.latest_step(), steps)
        restored = manager.restore(
            steps, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    self.assertIs(restored['data'], fresh)
    for got, want in zip(_take(fresh, 3), expected):
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


class EvalSequencesTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tok = tokenizers.ByteTokenizer()
    self.texts = ['a' * 3, 'b' * 10, 'c' * 5, 'd' * 20, 'e' * 9, 'f' * 4]

  def test_first_long_enough_documents_in_order(self):
    out = pipeline.eval_sequences(data_source=_source(self.texts), tokenizer=self.tok,
                                  length=10, count=3)
    self.assertEqual(out.dtype, np.int32)
    expected = [[1] + [ord(t[0]) + 3] * 9 for t in ('b', 'd', 'e')]  # BOS + 9 bytes >= 10
    np.testing.assert_array_equal(out, expected)
    longer = pipeline.eval_sequences(data_source=_source(self.texts), tokenizer=self.tok,
                                     length=11, count=2)
    np.testing.assert_array_equal(longer[:, :10], out[:2])  # same documents, longer prefix

  def test_too_few_documents(self):
    with self.assertRaisesRegex(ValueError, r'Only 1 of 6 .* longest has 21 tokens'):
      pipeline.eval_sequences(data_source=_source(self.texts), tokenizer=self.tok,
                              length=12, count=2)


class TextDirIntegrationTest(absltest.TestCase):
  """The whole path the trainer uses: files -> TFDS array_record -> packed batches."""

  def test_batches_reproduce_the_files(self):
    tok = tokenizers.ByteTokenizer()
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'src')
      os.mkdir(src)
      texts = [f'print({i})\n' * (i + 1) + '# ü\n' for i in range(6)]
      for i, text in enumerate(texts):
        with open(os.path.join(src, f'f{i}.py'), 'w', encoding='utf-8') as f:
          f.write(text)
      builder = text_dir.load_text_dir(source_dir=src, validation_percent=0,
                                        data_dir=os.path.join(tmp, 'data'))
      source = builder.as_data_source(split='train')
      rows = _rows(_take(pipeline.make_train_iterator(
          data_source=source, tokenizer=tok, seq_len=32, batch_size=2, seed=1,
          shuffle_window=1), 8))
      parsed, complete, _ = _parse_stream(rows.reshape(-1), tok)
      self.assertCountEqual([t for t, c in zip(parsed, complete) if c][:6], texts)
      out = pipeline.eval_sequences(data_source=source, tokenizer=tok, length=30, count=2)
      self.assertEqual(tok.decode(out[0]), texts[2][:29])


if __name__ == '__main__':
  absltest.main()
