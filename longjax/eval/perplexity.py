"""Loss and bits per byte as a function of context length and of token position.

The same validation documents are evaluated at every length: the sweep reads the first L tokens
of each document, so the loss at length L and the per-position curves are directly comparable
across lengths and across methods (a training-free extension applied to the same checkpoint).
"""

import functools
import math

import jax
import numpy as np
from tqdm import auto as tqdm

from longjax.data import pipeline
from longjax.training import step as step_lib


@functools.partial(jax.jit, static_argnums=0)
def _token_losses(graphdef, params, tokens):
  return step_lib.token_losses(graphdef, params, tokens)


def length_sweep(graphdef, params, *, sequences: np.ndarray, lengths: list[int], batch_size: int,
                 tokenizer, progress: bool = True) -> dict:
  """Evaluates the model on prefixes of `sequences`.

  Args:
    graphdef, params: the model.
    sequences: [count, >= max(lengths) + 1] int32 documents (BOS first).
    lengths: context lengths L; the model sees tokens [0, L) and predicts [1, L].
    batch_size: documents per forward pass.
    tokenizer: for the number of bytes the targets stand for (bits per byte).

  Returns:
    {"lengths", "loss" (mean nats/token), "bits_per_byte", "per_position" (L -> [L] mean loss
     at each position), "num_sequences"}.
  """
  result = {"lengths": [], "loss": [], "bits_per_byte": [], "per_position": {},
            "num_sequences": int(sequences.shape[0])}
  bar = tqdm.tqdm(total=len(lengths) * math.ceil(len(sequences) / batch_size),
                  desc="eval lengths", disable=not progress, leave=False)
  for length in lengths:
    losses = []
    for start in range(0, len(sequences), batch_size):
      batch = sequences[start:start + batch_size, :length + 1]
      losses.append(np.asarray(_token_losses(graphdef, params, batch)))
      bar.update()
    losses = np.concatenate(losses, axis=0)  # [count, L]
    num_bytes = sum(tokenizer.num_bytes(row[1:length + 1]) for row in sequences)
    result["lengths"].append(length)
    result["loss"].append(float(losses.mean()))
    result["bits_per_byte"].append(float(losses.sum() / math.log(2) / max(num_bytes, 1)))
    result["per_position"][str(length)] = losses.mean(axis=0).tolist()
  bar.close()
  return result


def sweep_sequences(validation_source, tokenizer, *, max_length: int, count: int) -> np.ndarray:
  """[count, max_length + 1] validation documents for `length_sweep`."""
  return pipeline.eval_sequences(data_source=validation_source, tokenizer=tokenizer,
                                 length=max_length + 1, count=count)


def fillable_sweep(validation_source, tokenizer, *, lengths: list[int],
                   count: int) -> tuple[np.ndarray, list[int], list[dict]]:
  """`sweep_sequences` for the longest of `lengths` that `count` validation documents reach.

  A training run at a long T asks for 16x T by default, which a small validation set may not
  hold; rather than fail after training, the lengths it cannot fill are left out and said so.

  Returns:
    (sequences [count, L + 1] for the longest kept length L, the kept lengths in increasing
    order, the skipped ones as {"length", "reason"}).

  Raises:
    ValueError: when not even the shortest length can be filled (the reason of that length).
  """
  kept, skipped = sorted(lengths), []
  while True:
    try:
      sequences = sweep_sequences(validation_source, tokenizer, max_length=kept[-1], count=count)
      return sequences, kept, skipped
    except ValueError as error:
      if len(kept) == 1:
        raise
      skipped.insert(0, {"length": kept.pop(), "reason": str(error)})


def unigram_baseline(train_source, validation_source, tokenizer, *, max_docs: int = 5000) -> float:
  """Cross-entropy (nats/token) of validation tokens under training-set token frequencies.

  The floor any model that ignores context reaches; a language model has to beat it clearly.
  Frequencies are add-one smoothed so unseen tokens have finite loss.
  """
  counts = np.ones(tokenizer.vocab_size, np.float64)
  for i in range(min(len(train_source), max_docs)):
    ids = tokenizer.encode(pipeline.record_text(train_source[i]))
    counts += np.bincount(ids, minlength=tokenizer.vocab_size)
  log_p = np.log(counts / counts.sum())
  total, n = 0.0, 0
  for i in range(len(validation_source)):
    ids = tokenizer.encode(pipeline.record_text(validation_source[i]))
    total -= log_p[ids].sum()
    n += len(ids)
  return float(total / max(n, 1))
