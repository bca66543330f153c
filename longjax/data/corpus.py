"""A run's corpus: the tokenizer and the train / validation data sources of its config.

Either text (`config.data`: a directory of files, tokenized by the run's tokenizer) or, when
`config.task.name` is set, a synthetic task's examples (`longjax.data.builders.synthetic_task`,
byte tokens, only the answers scored).
"""

import dataclasses
import os
from typing import Any

from longjax.data import pipeline
from longjax.data import tasks
from longjax.data import tokenizers
from longjax.data.builders import synthetic_task
from longjax.data.builders import text_dir
from longjax.errors import ConfigError

# A source directory that cannot make the dataset (one line; see `text_dir`).
SourceError = text_dir.SourceError


@dataclasses.dataclass
class Corpus:
  tokenizer: Any    # ByteTokenizer | SentencePieceTokenizer
  train: Any        # random-access data source of {"text", "path"} records, or task examples
  validation: Any
  task: str = ""    # the synthetic task's name; "" for text
  max_tokens: int = 0  # a task's longest example, in tokens

  def train_iterator(self, *, source, seq_len: int, batch_size: int, seed: int,
                     shard_index: int = 0, shard_count: int = 1):
    """Endless, checkpointable batches of `source` (see `pipeline`)."""
    common = dict(data_source=source, seq_len=seq_len, batch_size=batch_size, seed=seed,
                  shard_index=shard_index, shard_count=shard_count)
    if self.task:
      return pipeline.make_task_iterator(**common)
    return pipeline.make_train_iterator(tokenizer=self.tokenizer, **common)


def load_corpus(config, workdir: str) -> Corpus:
  """Builds (once, then reads) the run's array_record dataset and tokenizer.

  A SentencePiece model is trained on the training split the first time and kept in
  `workdir/tokenizer.model`, so evaluation and sampling of the run use the same one.

  Raises:
    ConfigError: a task run whose examples do not fit `data.seq_len + 1` tokens, or whose
      tokenizer is not `byte`.
    SourceError: the text source cannot make the dataset.
  """
  data_cfg = config.data
  if config.task.name:
    return _task_corpus(config, workdir)
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


def _task_corpus(config, workdir: str) -> Corpus:
  task = config.task
  tasks.require_byte_tokenizer(config)
  # An example of the largest size first: a too-short data.seq_len is refused before the
  # dataset is built; the build's own maximum is checked after (lengths vary a little).
  spec = tasks.get(task.name)
  sizes = tasks.parse_sizes("task.train_sizes", task.train_sizes)
  depth = {"depth": 0.5} if spec.has_depth else {}
  for size in (sizes[0], sizes[-1]):  # a size the task cannot make: refused here, in one line
    probe = tasks.sized("task.train_sizes", lambda n: spec.generate(
        task[spec.name], tasks.example_rng(task.seed, 0, 0), n, **depth), size)
  _check_fits(config, len(probe.tokens))
  builder = synthetic_task.load_synthetic_task(
      task, data_dir=os.path.expanduser(config.data.tfds_dir))
  max_tokens = int(builder.info.metadata["max_tokens"])
  _check_fits(config, max_tokens)
  os.makedirs(workdir, exist_ok=True)
  return Corpus(tokenizer=tokenizers.ByteTokenizer(), train=builder.as_data_source(split="train"),
                validation=builder.as_data_source(split="validation"), task=task.name,
                max_tokens=max_tokens)


def _check_fits(config, tokens: int) -> None:
  if tokens > config.data.seq_len + 1:
    raise ConfigError("data.seq_len", config.data.seq_len,
                      f"the longest {config.task.name} example of task.train_sizes="
                      f"{config.task.train_sizes!r} has {tokens} tokens; need data.seq_len "
                      f">= {tokens - 1}")
