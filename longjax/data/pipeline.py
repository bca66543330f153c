"""grain input pipelines: packed language-model batches for training, fixed sequences for eval.

Training stream (one host's share):

  documents -> shard by host -> shuffle (reshuffled each epoch, repeats forever)
  -> tokens [BOS] + encode(text) + [EOS] -> concatenate-then-split into rows of T + 1 tokens
  -> shuffle rows within windows -> shift into (inputs, targets) -> batch.

The row shuffle matters: a 20 kB source file fills ~150 consecutive rows of 129 bytes, so
without it a batch would be one or two documents and its gradient far noisier than the batch
size suggests (measured on the quickstart: the training loss swung by +-1 nat between batches).

Packing uses grain's `ConcatThenSplitIterDataset`, whose state is a parent index plus a slice,
so the whole iterator checkpoints with `get_state()`/`set_state()` or grain's orbax handler.
"""

from __future__ import annotations

from collections.abc import Mapping
import json
from typing import Any

import grain
import numpy as np

from longjax.data import tokenizers as tokenizers_lib

_TOKENS = 'tokens'
# Documents read ahead by the source stage. Reading is cheap and grain's default (16 threads,
# 500 documents) would hold ~500 tokenized files in memory on a machine with two cores.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=16)
# Rows shuffled together: ~1 MB of text at T = 128, i.e. dozens of documents per window.
DEFAULT_SHUFFLE_WINDOW = 8192


def record_text(record: Any) -> str:
  """The text of a data-source record: a dict with 'text' (TFDS gives bytes), or a string."""
  text = record['text'] if isinstance(record, Mapping) else record
  return text.decode('utf-8') if isinstance(text, bytes) else text


def document_tokens(record: Any, tokenizer: tokenizers_lib.Tokenizer, *,
                    add_eos: bool = True) -> np.ndarray:
  """Returns int32 [L]: [BOS] + encode(text) (+ [EOS]) for one data-source record; a synthetic
  task's record (`tokens`, already BOS ... EOS) gives its tokens (without the EOS if asked)."""
  if isinstance(record, Mapping) and _TOKENS in record:
    tokens = np.asarray(record[_TOKENS], np.int32)
    return tokens if add_eos else tokens[:-1]
  ids = tokenizer.encode(record_text(record))
  parts = [np.array([tokenizer.bos_id], np.int32), ids]
  if add_eos:
    parts.append(np.array([tokenizer.eos_id], np.int32))
  return np.concatenate(parts).astype(np.int32, copy=False)


def lm_example(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Shifts one packed row of T + 1 tokens into a language-model example of length T.

  Args:
    row: 'tokens', 'tokens_segment_ids', 'tokens_positions', each int [T + 1], as produced by
      `ConcatThenSplitIterDataset` (segment id 0 marks padding).

  Returns:
    'inputs', 'targets', 'segment_ids', 'positions' int32 [T] and 'weights' float32 [T], where
    a weight is 1 iff the target is a real token of the same segment as the input.
  """
  tokens = row[_TOKENS]
  segments = row[f'{_TOKENS}_segment_ids']
  positions = row[f'{_TOKENS}_positions']
  same_segment = (segments[1:] == segments[:-1]) & (segments[1:] != 0)
  return {
      'inputs': tokens[:-1].astype(np.int32),
      'targets': tokens[1:].astype(np.int32),
      'segment_ids': segments[:-1].astype(np.int32),
      'positions': positions[:-1].astype(np.int32),
      'weights': same_segment.astype(np.float32),
  }


class _JsonSafeStateIterator(grain.DatasetIterator):
  """Passes elements through; makes the state survive a JSON round trip unchanged.

  grain's orbax handler stores `get_state()` as JSON, which turns the tuples inside
  ConcatThenSplit's state into lists; that iterator then compares them with a tuple sentinel
  and, after a restore, would believe every state has a half-consumed document. We hand out
  the state with tuples already as lists and turn them back into tuples in `set_state`.
  """

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return json.loads(json.dumps(self._parent.get_state()))

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_lists_to_tuples(state))


def _lists_to_tuples(state: Any) -> Any:
  """Converts every list in a JSON-decoded state back to a tuple.

  Safe for this pipeline: below the wrapper, only ConcatThenSplit's slices are sequences.
  """
  if isinstance(state, dict):
    return {k: _lists_to_tuples(v) for k, v in state.items()}
  if isinstance(state, (list, tuple)):
    return tuple(_lists_to_tuples(v) for v in state)
  return state


class _JsonSafeState(grain.IterDataset):
  """See `_JsonSafeStateIterator`."""

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonSafeStateIterator(self._parent.__iter__())


def make_train_iterator(*, data_source, tokenizer: tokenizers_lib.Tokenizer, seq_len: int,
                        batch_size: int, seed: int, shard_index: int = 0,
                        shard_count: int = 1,
                        shuffle_window: int = DEFAULT_SHUFFLE_WINDOW) -> grain.DatasetIterator:
  """Returns an endless, checkpointable iterator of packed language-model batches.

  Documents of this host's shard (every `shard_count`-th document from `shard_index`) are
  shuffled with `seed` (a new order each epoch), tokenized as [BOS] + text + [EOS] and
  concatenated into one stream that is cut into rows of `seq_len + 1` tokens. A document that
  does not fit is continued in the next row(s): nothing is dropped, and the continued piece
  starts a new segment whose positions restart at 0 (no BOS is inserted). The last token of
  a row is only a target, so one next-token prediction per row boundary is not trained.
  Rows are then shuffled in tumbling windows of `shuffle_window` rows, so that a batch mixes
  many documents.

  Args:
    data_source: random-access source of records with a 'text' field (str or UTF-8 bytes),
      e.g. `builder.as_data_source(split='train')`.
    tokenizer: see `longjax.data.tokenizers`.
    seq_len: T, the model's training length.
    batch_size: B, rows per batch on this host.
    seed: shuffle seed in [0, 2**32); epoch e uses seed + e (grain's rule).
    shard_index: this host's index in [0, shard_count).
    shard_count: number of hosts reading disjoint shares of the documents.
    shuffle_window: rows shuffled together (1 = keep the packed order). A restored iterator
      refills its current window from the window's start, so resuming stays exact.

  Returns:
    A `grain.DatasetIterator` of dicts: 'inputs', 'targets', 'segment_ids' (1, 2, ... per
    document piece, 0 on padding), 'positions' int32 [B, T] and 'weights' float32 [B, T] (1
    where the target continues the input's document). `get_state()`/`set_state()` resume it.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'Need 0 <= shard_index < shard_count, got {shard_index}/{shard_count}.')
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f'seq_len and batch_size must be positive, got {seq_len}, {batch_size}.')
  docs = grain.MapDataset.source(data_source)[shard_index::shard_count]
  if not len(docs):  # pylint: disable=g-explicit-length-test
    raise ValueError(f'Shard {shard_index} of {shard_count} has no documents '
                     f'({len(data_source)} in the source).')
  # Shuffle before repeat: grain's shuffle maps index // len to the epoch and reseeds it.
  docs = docs.shuffle(seed=seed).repeat()
  docs = docs.map(lambda record: {_TOKENS: document_tokens(record, tokenizer)})
  rows = grain.experimental.ConcatThenSplitIterDataset(
      docs.to_iter_dataset(_READ_OPTIONS), length_struct={_TOKENS: seq_len + 1})
  if shuffle_window > 1:
    rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=shuffle_window,
                                                       seed=seed)
  batches = _JsonSafeState(rows).map(lm_example).batch(batch_size, drop_remainder=True)
  return iter(batches)


def eval_sequences(*, data_source, tokenizer: tokenizers_lib.Tokenizer, length: int,
                   count: int) -> np.ndarray:
  """Returns the first `length` tokens of the first `count` documents long enough, in order.

  Tokens are [BOS] + encode(text) (no EOS: a prefix of a longer document has none). Use the
  largest length you need and crop prefixes, so that every length sees the same documents.

  Args:
    data_source: random-access source of records with a 'text' field, read in index order.
    tokenizer: see `longjax.data.tokenizers`.
    length: S, tokens per sequence (including the BOS).
    count: N, number of sequences.

  Returns:
    int32 [N, S].

  Raises:
    ValueError: fewer than `count` documents have `length` tokens; the message gives how many
      did and the longest document's length.
  """
  if length < 1 or count < 0:
    raise ValueError(f'Need length >= 1 and count >= 0, got {length}, {count}.')
  if count == 0:
    return np.zeros((0, length), np.int32)
  rows = []
  longest = 0
  for index in range(len(data_source)):
    tokens = document_tokens(data_source[index], tokenizer, add_eos=False)
    longest = max(longest, len(tokens))
    if len(tokens) >= length:
      rows.append(tokens[:length])
      if len(rows) == count:
        return np.stack(rows)
  raise ValueError(f'Only {len(rows)} of {len(data_source)} documents have >= {length} tokens '
                   f'(need {count}); the longest has {longest} tokens.')


def task_row(record: Mapping[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One synthetic-task example as a training row of length T, padded, only answers weighted.

  Args:
    record: 'tokens' int [n] and 'scored' bool [n] with n <= T + 1
      (`longjax.data.builders.synthetic_task`).
    seq_len: T.

  Returns:
    As `lm_example`: 'inputs', 'targets', 'segment_ids' (1 on the example, 0 on padding),
    'positions' int32 [T] and 'weights' float32 [T], 1 where the target is a scored token.
  """
  tokens = np.asarray(record['tokens'], np.int32)
  scored = np.asarray(record['scored'], bool)
  n = len(tokens)
  if n > seq_len + 1:
    raise ValueError(f'a task example of {n} tokens does not fit data.seq_len + 1 = '
                     f'{seq_len + 1}')
  row = np.zeros(seq_len + 1, np.int32)
  row[:n] = tokens
  weights = np.zeros(seq_len + 1, np.float32)
  weights[:n] = scored
  segments = (np.arange(seq_len) < n - 1).astype(np.int32)
  return {'inputs': row[:-1], 'targets': row[1:], 'segment_ids': segments,
          'positions': np.arange(seq_len, dtype=np.int32) * segments,
          'weights': weights[1:]}


def make_task_iterator(*, data_source, seq_len: int, batch_size: int, seed: int,
                       shard_index: int = 0, shard_count: int = 1) -> grain.DatasetIterator:
  """Endless, checkpointable batches of synthetic-task examples, one example per row.

  This host's examples (every `shard_count`-th from `shard_index`) are shuffled with `seed`,
  reshuffled each epoch, and padded into rows by `task_row`; one example per row, as the
  length-generalisation papers train (a packed neighbour would be context the test never has).

  Returns:
    A `grain.DatasetIterator` of the same batches as `make_train_iterator`.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(f'Need 0 <= shard_index < shard_count, got {shard_index}/{shard_count}.')
  examples = grain.MapDataset.source(data_source)[shard_index::shard_count]
  if not len(examples):  # pylint: disable=g-explicit-length-test
    raise ValueError(f'Shard {shard_index} of {shard_count} has no examples.')
  rows = examples.shuffle(seed=seed).repeat().map(lambda r: task_row(r, seq_len))
  return iter(rows.to_iter_dataset(_READ_OPTIONS).batch(batch_size, drop_remainder=True))
