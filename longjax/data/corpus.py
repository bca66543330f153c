"""A run's corpus: the tokenizer and the train / validation data sources of `config.data`."""

import dataclasses
import os
from typing import Any

from longjax.data import pipeline
from longjax.data import tokenizers
from longjax.data.builders import text_dir

# A source directory that cannot make the dataset (one line; see `text_dir`).
SourceError = text_dir.SourceError


@dataclasses.dataclass
class Corpus:
  tokenizer: Any    # ByteTokenizer | SentencePieceTokenizer
  train: Any        # random-access data source of {"text", "path"} records
  validation: Any


def load_corpus(data_cfg, workdir: str) -> Corpus:
  """Builds (once, then reads) the array_record dataset and the tokenizer of a run.

  A SentencePiece model is trained on the training split the first time and kept in
  `workdir/tokenizer.model`, so evaluation and sampling of the run use the same one.
  """
  builder = text_dir.load_text_dir(
      source_dir=data_cfg.source_dir or None, glob=data_cfg.glob,
      validation_percent=data_cfg.validation_percent,
      data_dir=os.path.expanduser(data_cfg.tfds_dir))
  os.makedirs(workdir, exist_ok=True)  # after the dataset: a bad source leaves no run folder
  train = builder.as_data_source(split="train")
  validation = builder.as_data_source(split="validation")
  # SentencePiece trains on every 8th training document: on the stdlib that is ~3.6M characters,
  # 12 s instead of 207 s (and 1 GB) for all of them, at the same bytes/token on validation.
  tokenizer = tokenizers.build_tokenizer(
      data_cfg.tokenizer, model_path=os.path.join(workdir, "tokenizer.model"),
      texts=lambda: (pipeline.record_text(train[i]) for i in range(0, len(train), 8)),
      vocab_size=data_cfg.vocab_size)
  return Corpus(tokenizer=tokenizer, train=train, validation=validation)
