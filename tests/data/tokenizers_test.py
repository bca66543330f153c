"""Tests for longjax.data.tokenizers: round trips, special ids, byte counts, train/load."""

import os
import sysconfig
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from longjax.data import tokenizers

_TEXTS = (
    '',
    'hello world',
    'héllo wörld — naïve café',
    'emoji 😀👍🏽 and CJK 漢字かな',
    'tabs\tand\nnewlines\r\n  indented\n\n',
    'def f(x):\n    return x ** 2  # comment\n',
)


def _stdlib_texts(n=12):
  """A few small stdlib sources: a corpus every machine has, independent of our builder."""
  root = os.path.join(sysconfig.get_paths()['stdlib'], 'json')
  names = sorted(f for f in os.listdir(root) if f.endswith('.py'))[:n]
  texts = []
  for name in names:
    with open(os.path.join(root, name), encoding='utf-8') as f:
      texts.append(f.read())
  return texts


class ByteTokenizerTest(parameterized.TestCase):

  @parameterized.parameters(*_TEXTS)
  def test_encode_is_utf8_bytes_plus_three_and_round_trips(self, text):
    tok = tokenizers.ByteTokenizer()
    ids = tok.encode(text)
    self.assertEqual(ids.dtype, np.int32)
    self.assertEqual(ids.tolist(), [b + 3 for b in text.encode('utf-8')])
    self.assertEqual(tok.decode(ids), text)
    self.assertEqual(tok.num_bytes(ids), len(text.encode('utf-8')))

  def test_specials(self):
    tok = tokenizers.ByteTokenizer()
    self.assertEqual((tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size), (0, 1, 2, 259))
    ids = np.concatenate([[1], tok.encode('a😀'), [2, 0, 0]])
    self.assertEqual(tok.decode(ids), 'a😀')
    self.assertEqual(tok.num_bytes(ids), 5)
    self.assertEqual(tok.encode('\x00').tolist(), [3])
    self.assertEqual(tok.decode([258]), '\ufffd')  # byte 0xff is never valid UTF-8

  def test_decode_accepts_batches(self):
    tok = tokenizers.ByteTokenizer()
    ids = np.stack([tok.encode('ab'), tok.encode('cd')])
    self.assertEqual(tok.decode(ids), 'abcd')
    self.assertEqual(tok.num_bytes(ids), 4)


class SentencePieceTokenizerTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.corpus = _stdlib_texts()
    cls.model_path = os.path.join(cls._tmp.name, 'sub', 'spm.model')
    cls.tok = tokenizers.SentencePieceTokenizer.train(
        cls.corpus, vocab_size=600, model_path=cls.model_path)

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def test_specials_agree_with_byte_tokenizer(self):
    byte = tokenizers.ByteTokenizer()
    self.assertEqual((self.tok.pad_id, self.tok.bos_id, self.tok.eos_id),
                     (byte.pad_id, byte.bos_id, byte.eos_id))
    self.assertBetween(self.tok.vocab_size, 261, 600)
    ids = self.tok.encode('import json')
    self.assertEqual(self.tok.decode(np.concatenate([[1], ids, [2, 0]])), 'import json')

  def test_round_trip_on_corpus(self):
    for text in self.corpus:
      ids = self.tok.encode(text)
      self.assertEqual(self.tok.decode(ids), text)
      self.assertEqual(self.tok.num_bytes(ids), len(text.encode('utf-8')))
      # A trained model must compress code; bytes would give one id per byte.
      self.assertLess(len(ids), 0.7 * len(text.encode('utf-8')))

  @parameterized.parameters(*_TEXTS)
  def test_round_trip_unseen_text_via_byte_fallback(self, text):
    ids = self.tok.encode(text)
    self.assertEqual(ids.dtype, np.int32)
    self.assertEqual(self.tok.decode(ids), text)
    self.assertEqual(self.tok.num_bytes(ids), len(text.encode('utf-8')))

  def test_load_gives_identical_ids(self):
    loaded = tokenizers.SentencePieceTokenizer.load(self.model_path)
    self.assertEqual(loaded.vocab_size, self.tok.vocab_size)
    for text in self.corpus[:3] + list(_TEXTS):
      np.testing.assert_array_equal(loaded.encode(text), self.tok.encode(text))

  def test_build_tokenizer_trains_once_then_loads(self):
    path = os.path.join(self._tmp.name, 'built.model')
    calls = []

    def texts():
      calls.append(1)
      return iter(self.corpus)

    first = tokenizers.build_tokenizer('sentencepiece', model_path=path, texts=texts,
                                       vocab_size=500)
    second = tokenizers.build_tokenizer('sentencepiece', model_path=path, texts=texts,
                                        vocab_size=500)
    self.assertLen(calls, 1)
    text = self.corpus[0]
    np.testing.assert_array_equal(first.encode(text), second.encode(text))


class BuildTokenizerTest(absltest.TestCase):

  def test_byte(self):
    self.assertIsInstance(tokenizers.build_tokenizer('byte'), tokenizers.ByteTokenizer)

  def test_unknown_kind_names_valid_choices(self):
    with self.assertRaisesRegex(ValueError, r'byte.*sentencepiece'):
      tokenizers.build_tokenizer('wordpiece')

  def test_sentencepiece_without_model_or_texts(self):
    with self.assertRaises(ValueError):
      tokenizers.build_tokenizer('sentencepiece')
    with tempfile.TemporaryDirectory() as tmp, self.assertRaises(ValueError):
      tokenizers.build_tokenizer('sentencepiece', model_path=os.path.join(tmp, 'x.model'))


if __name__ == '__main__':
  absltest.main()
