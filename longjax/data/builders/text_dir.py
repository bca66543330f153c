"""`text_dir`: a TFDS builder that turns a directory of text files into an array_record dataset.

Each example is one file: `text` (its content) and `path` (relative to the source directory,
'/'-separated). The default source is the running interpreter's standard library (`*.py`
without site-packages), a corpus of code that every machine has and that needs no download.

Splits are by file: a file goes to `validation` iff crc32(relative path) % 100 < percent, so
membership depends only on the path, never on the other files or on Python's salted hash().
Records are written in sorted path order. Files that are not text (not valid UTF-8, or holding
a NUL byte) are skipped with a count in the log, empty or whitespace-only ones silently. A source
that cannot make both splits (no matching file, no usable one, an empty split, an unreadable
file) raises `SourceError` before anything is written under `data_dir`.

Reading needs no TensorFlow: `builder.as_data_source(split)` returns a random-access source
whose records are dicts of `bytes` (TFDS `Text` features decode to bytes in NumPy mode).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import sysconfig
import zlib

from etils import epath
import tensorflow_datasets as tfds

_EXCLUDED_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})


_BLANK = 'empty or whitespace-only'
_BINARY = 'binary'  # not UTF-8 text, or holding a NUL byte


class SourceError(ValueError):
  """The source directory cannot make the dataset; str(error) is one line saying why."""


def default_source_dir() -> str:
  """Returns the running interpreter's standard-library directory."""
  return sysconfig.get_paths()['stdlib']


def is_validation(relative_path: str, validation_percent: int) -> bool:
  """The split rule: a stable hash of the file's relative path, mod 100, below the percent."""
  return zlib.crc32(relative_path.encode('utf-8')) % 100 < validation_percent


def list_files(source_dir: str, glob: str) -> list[str]:
  """Returns the sorted '/'-separated relative paths of files under `source_dir` matching `glob`.

  Paths with a `site-packages`, `dist-packages` or `__pycache__` component are left out.
  """
  root = pathlib.Path(source_dir)
  paths = set()
  for p in root.glob(glob):
    rel = p.relative_to(root)
    if _EXCLUDED_DIRS.isdisjoint(rel.parts) and p.is_file():
      paths.add(rel.as_posix())
  return sorted(paths)


@dataclasses.dataclass(eq=False, kw_only=True)
class TextDirConfig(tfds.core.BuilderConfig):
  """Which files to read; `make_config` derives the config name from these fields."""

  source_dir: str = ''
  glob: str = '**/*.py'
  validation_percent: int = 5


def make_config(source_dir: str | None = None, glob: str = '**/*.py',
                validation_percent: int = 5) -> TextDirConfig:
  """Returns the config for these parameters, named '<readable prefix>_<10-hex hash>'.

  The hash covers the resolved source directory, the glob and the percent, so different
  corpora never share a directory under `data_dir`; the prefix is 'stdlib' for the default
  source, else the source directory's base name.
  """
  if not 0 <= validation_percent <= 100:
    raise ValueError(f'validation_percent must be in [0, 100], got {validation_percent}.')
  is_default = source_dir is None
  source_dir = os.path.realpath(default_source_dir() if is_default else source_dir)
  key = json.dumps([source_dir, glob, int(validation_percent)])
  digest = hashlib.sha1(key.encode('utf-8')).hexdigest()[:10]
  prefix = 'stdlib' if is_default else re.sub(r'[^a-z0-9]+', '_',
                                               os.path.basename(source_dir).lower()).strip('_')
  return TextDirConfig(
      name=f'{prefix or "dir"}_{digest}',
      description=f'{glob} under {source_dir}, {validation_percent}% validation',
      source_dir=source_dir, glob=glob, validation_percent=int(validation_percent))


class TextDir(tfds.core.GeneratorBasedBuilder):
  """Any directory of text files as `train`/`validation` splits (see the module docstring)."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'Files that are not UTF-8 text are skipped (were decoded with '
                            "errors='replace')."}
  BUILDER_CONFIGS = [make_config()]  # the stdlib default, so `tfds.builder('text_dir')` works

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS 4.9.10 resolves this through `importlib_resources`, which it only installs for
    # Python < 3.9, so the inherited property raises ModuleNotFoundError for any builder that
    # lives in a package. This file is the code path TFDS wants (for checksums, none here).
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # `DatasetInfo(builder=self, ...)` rather than `dataset_info_from_configs`: the latter
    # looks for metadata files beside the module, which only a TFDS package directory has.
    return tfds.core.DatasetInfo(
        builder=self,
        description='Text files of a directory, one example per file.',
        features=tfds.features.FeaturesDict({
            'text': tfds.features.Text(),
            'path': tfds.features.Text(),
        }),
        disable_shuffling=True,  # keep our sorted-by-path order on disk
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    config = self.builder_config
    documents, skipped = read_documents(config.source_dir, config.glob)
    splits = split_paths(sorted(documents), config, skipped)
    return {name: self._generate_examples(paths, documents) for name, paths in splits.items()}

  def _generate_examples(self, relative_paths, documents):
    for i, rel in enumerate(relative_paths):
      yield i, {'text': documents[rel], 'path': rel}


def read_documents(source_dir: str, glob: str) -> tuple[dict[str, str], dict[str, list[str]]]:
  """Reads the files of the corpus.

  Returns:
    ({relative path: text} of the usable files, {why skipped: [relative paths]}).

  Raises:
    SourceError: no file matches, or a file cannot be read.
  """
  paths = list_files(source_dir, glob)
  if not paths:
    raise SourceError(f'no file under {source_dir} matches {glob!r} (data.source_dir, '
                      'data.glob)')
  documents, skipped = {}, {}
  for rel in paths:
    try:
      data = (pathlib.Path(source_dir) / rel).read_bytes()
    except OSError as e:
      raise SourceError(f'cannot read {os.path.join(source_dir, rel)} ({e.strerror}); fix it '
                        'or narrow data.glob') from None
    try:
      text = None if b'\0' in data else data.decode('utf-8')
    except UnicodeDecodeError:
      text = None
    if text is None:
      skipped.setdefault(_BINARY, []).append(rel)
    elif not text.strip():
      skipped.setdefault(_BLANK, []).append(rel)
    else:
      documents[rel] = text
  return documents, skipped


def split_paths(paths: list[str], config: TextDirConfig,
                skipped: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
  """{'train': [...], 'validation': [...]} by the split rule, leaving out a split the percent
  asks to be empty (0 or 100); SourceError if a split it asks for has no file.

  Args:
    paths: the usable files.
    config: the builder's config.
    skipped: `read_documents`' skipped files, counted in the error: a source of binary files
      would otherwise read as merely empty.
  """
  percent = config.validation_percent
  counts = ', '.join(f'{len(files)} {why}' for why, files in (skipped or {}).items())
  also = f' (skipped: {counts})' if counts else ''
  splits = {'train': [p for p in paths if not is_validation(p, percent)],
            'validation': [p for p in paths if is_validation(p, percent)]}
  wanted = {'train': percent < 100, 'validation': percent > 0}
  for name, files in splits.items():
    if wanted[name] and not files:
      raise SourceError(
          f'{len(paths)} usable file(s){also} matching {config.glob!r} under '
          f'{config.source_dir} put none in the {name} split at data.validation_percent='
          f'{percent}; add files or change the percent')
  return {name: files for name, files in splits.items() if files}


class _DropExpectedWarnings(logging.Filter):
  """Drops TFDS warnings that every `text_dir` build triggers by design."""

  _EXPECTED = ('Using custom data configuration', 'Variant folder')

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._EXPECTED)


@contextlib.contextmanager
def quiet():
  """Hides TFDS's progress bars and expected warnings for the block, restoring both after."""
  # tqdm_utils keeps a module-level flag; there is no public getter, so read it directly.
  from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=g-import-not-at-top
  previous = tqdm_utils._active  # pylint: disable=protected-access
  tqdm_utils.display_progress_bar(False)
  log_filter = _DropExpectedWarnings()
  logger = logging.getLogger('absl')  # TFDS logs through absl, which logs here
  logger.addFilter(log_filter)
  try:
    yield
  finally:
    logger.removeFilter(log_filter)
    tqdm_utils.display_progress_bar(previous)


def load_text_dir(*, source_dir: str | None = None, glob: str = '**/*.py',
                  validation_percent: int = 5, data_dir: str) -> TextDir:
  """Builds the dataset under `data_dir` if it is not there yet and returns its builder.

  Idempotent: a second call finds the prepared data and only reads its metadata. The data is
  keyed by the parameters, not by the files' contents: after editing the source directory,
  delete `data_dir/text_dir/<config name>` to rebuild.

  Args:
    source_dir: directory of text files; None means the interpreter's standard library.
    glob: pattern relative to `source_dir` (pathlib syntax, `**` recurses).
    validation_percent: share of files (by path hash) that goes to `validation`.
    data_dir: TFDS data directory; the data lands in `text_dir/<config name>/<VERSION>/`.

  Returns:
    The builder; read with `builder.as_data_source(split='train')` (records are dicts with
    `text` and `path` as UTF-8 `bytes`).
  """
  config = make_config(source_dir, glob, validation_percent)
  default = TextDir.BUILDER_CONFIGS[0]
  if config.name == default.name:
    config = default  # TFDS rejects a custom config that shares a predefined config's name
  with quiet():
    builder = TextDir(config=config, data_dir=data_dir)
    if not builder.is_prepared():
      # Checked before TFDS writes anything, so a bad source leaves no half-built dataset.
      documents, skipped = read_documents(config.source_dir, config.glob)
      # A refused source's error counts the skipped files itself (one line, no warning first).
      split_paths(sorted(documents), config, skipped)
      total = len(documents) + sum(map(len, skipped.values()))
      for why, paths in skipped.items():
        if why == _BLANK:
          continue  # nothing in them to lose
        logging.getLogger('absl').warning(
            'text_dir: skipped %d of %d files under %s as %s (not UTF-8 text, or holding a NUL '
            'byte), e.g. %s', len(paths), total, config.source_dir, why, paths[0])
      builder.download_and_prepare(
          file_format='array_record',
          download_config=tfds.download.DownloadConfig(
              compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
