"""Tokenizers: a byte-level default (no download) and a locally trained SentencePiece model.

Both share one small interface, used by the data pipeline and the evaluator:

  * `pad_id`, `bos_id`, `eos_id` (always 0, 1, 2) and `vocab_size`;
  * `encode(text) -> int32 [L]` without BOS/EOS, `decode(ids) -> str` dropping specials;
  * `num_bytes(ids) -> int`, the UTF-8 bytes the ids stand for, so that losses in nats per
    token convert to bits per byte identically for every tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
import io
import re

from etils import epath
import numpy as np
import sentencepiece as spm

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
_BYTE_OFFSET = 3  # ByteTokenizer: byte b has id b + 3.


class ByteTokenizer:
  """UTF-8 bytes as tokens: PAD=0, BOS=1, EOS=2 and byte b -> b + 3 (vocab_size 259)."""

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID
  vocab_size = 256 + _BYTE_OFFSET

  def encode(self, text: str) -> np.ndarray:
    """Returns int32 [L]: the UTF-8 bytes of `text` shifted by 3 (no BOS/EOS added)."""
    # frombuffer avoids a Python loop over bytes; the + makes a fresh writable int32 array.
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32) + _BYTE_OFFSET

  def decode(self, ids) -> str:
    """Returns the text of `ids` (any shape); special ids are dropped, bad UTF-8 replaced."""
    ids = np.asarray(ids).reshape(-1)
    byte_ids = ids[(ids >= _BYTE_OFFSET) & (ids < self.vocab_size)] - _BYTE_OFFSET
    return byte_ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def num_bytes(self, ids) -> int:
    """Returns how many UTF-8 bytes `ids` (any shape) represent: one per non-special id."""
    ids = np.asarray(ids)
    return int(np.count_nonzero((ids >= _BYTE_OFFSET) & (ids < self.vocab_size)))


_BYTE_PIECE = re.compile(r'^<0x[0-9A-F]{2}>$')


class SentencePieceTokenizer:
  """A SentencePiece model trained locally; specials share ids with `ByteTokenizer`.

  The model is trained lossless: identity normalisation, whitespace kept as is, no dummy
  prefix, and byte fallback for characters outside the vocabulary, so
  `decode(encode(text)) == text` for any text except one containing U+2581 ('▁'), which
  SentencePiece uses internally for the space and therefore decodes to ' '.
  """

  pad_id = PAD_ID
  bos_id = BOS_ID
  eos_id = EOS_ID

  def __init__(self, model_proto: bytes):
    """Wraps a serialized SentencePiece model (the content of a `.model` file)."""
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    if (self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()) != (PAD_ID, BOS_ID, EOS_ID):
      raise ValueError('SentencePiece model must use pad/bos/eos ids 0/1/2, got '
                       f'{self._sp.pad_id()}/{self._sp.bos_id()}/{self._sp.eos_id()}.')
    self.vocab_size = self._sp.get_piece_size()
    # Bytes per id, looked up in one vectorised gather by `num_bytes`.
    table = np.zeros(self.vocab_size, dtype=np.int64)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      piece = self._sp.id_to_piece(i)
      table[i] = 1 if _BYTE_PIECE.match(piece) else len(piece.replace('▁', ' ').encode('utf-8'))
    self._bytes_per_id = table

  @classmethod
  def train(cls, texts: Iterable[str], *, vocab_size: int,
            model_path: str) -> SentencePieceTokenizer:
    """Trains a unigram model on `texts`, writes it to `model_path` and returns it.

    Args:
      texts: documents; each is one training "sentence" (newlines included).
      vocab_size: requested size including the 4 specials and 256 byte pieces, so it must be
        above 260; on a corpus too small for it the model comes out smaller.
      model_path: where the serialized model is written (any `etils.epath` path).

    Returns:
      The trained tokenizer.
    """
    if vocab_size <= 256 + 4:
      raise ValueError(f'vocab_size must exceed 260 (4 specials + 256 bytes), got {vocab_size}.')
    writer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t for t in texts if t),
        model_writer=writer,
        vocab_size=vocab_size,
        model_type='unigram',
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=3,
        byte_fallback=True,
        # Code needs exact whitespace: no NFKC, no collapsing of spaces, no leading '▁'.
        normalization_rule_name='identity',
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,  # indentation runs become single pieces
        max_sentence_length=1 << 22,  # whole source files are sentences; the default skips them
        hard_vocab_limit=False,  # a small corpus yields a smaller vocab instead of an error
        num_threads=1,  # the machines we train on share few cores
        minloglevel=2,
    )
    path = epath.Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(writer.getvalue())
    return cls(writer.getvalue())

  @classmethod
  def load(cls, model_path: str) -> SentencePieceTokenizer:
    """Loads a model written by `train` (or any SentencePiece model with ids 0/1/2 special)."""
    return cls(epath.Path(model_path).read_bytes())

  def encode(self, text: str) -> np.ndarray:
    """Returns int32 [L], the piece ids of `text` (no BOS/EOS added)."""
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def decode(self, ids) -> str:
    """Returns the text of `ids` (any shape); pad/bos/eos/unk are dropped."""
    ids = np.asarray(ids).reshape(-1)
    keep = (ids >= 0) & (ids < self.vocab_size)
    keep[keep] = self._bytes_per_id[ids[keep]] > 0
    return self._sp.decode([int(i) for i in ids[keep]])

  def num_bytes(self, ids) -> int:
    """Returns how many UTF-8 bytes `ids` (any shape) represent."""
    return int(self._bytes_per_id[np.asarray(ids)].sum())


Tokenizer = ByteTokenizer | SentencePieceTokenizer

_KINDS = ('byte', 'sentencepiece')


def build_tokenizer(kind: str, *, model_path: str | None = None,
                    texts: Callable[[], Iterable[str]] | None = None,
                    vocab_size: int = 0) -> Tokenizer:
  """Returns the tokenizer named `kind`.

  Args:
    kind: 'byte' or 'sentencepiece'.
    model_path: sentencepiece only: the model file, loaded if it exists, else trained and
      written there.
    texts: sentencepiece only: called (lazily, only when training) for the training texts.
    vocab_size: sentencepiece only: vocabulary size to train.

  Returns:
    A tokenizer with `pad_id/bos_id/eos_id/vocab_size`, `encode`, `decode`, `num_bytes`.
  """
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'sentencepiece':
    if not model_path:
      raise ValueError('kind="sentencepiece" needs model_path.')
    if epath.Path(model_path).exists():
      return SentencePieceTokenizer.load(model_path)
    if texts is None or vocab_size <= 0:
      raise ValueError(f'No SentencePiece model at {model_path}; training one needs `texts` and '
                       'a positive `vocab_size`.')
    return SentencePieceTokenizer.train(texts(), vocab_size=vocab_size, model_path=model_path)
  raise ValueError(f'Unknown tokenizer kind {kind!r}; valid kinds: {", ".join(_KINDS)}.')
