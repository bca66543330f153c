"""`text_dir`: a TFDS builder that turns a directory of text files into an array_record dataset.

Each example is one file: `text` (its content) and `path` (relative to the source directory,
'/'-separated). The default source is the running interpreter's standard library (`*.py`
without site-packages), a corpus of code that every machine has and that needs no download.

Splits are by file: a file goes to `validation` iff crc32(relative path) % 100 < percent, so
membership depends only on the path, never on the other files or on Python's salted hash().
Records are written in sorted path order. Files that are not valid UTF-8 are kept and decoded
with errors='replace'; empty or whitespace-only files are skipped.

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

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
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
    paths = list_files(config.source_dir, config.glob)
    if not paths:
      raise ValueError(f'No files match {config.glob!r} under {config.source_dir}.')
    validation = [p for p in paths if is_validation(p, config.validation_percent)]
    train = [p for p in paths if not is_validation(p, config.validation_percent)]
    # An empty split would make TFDS fail; tiny corpora may have no validation file at all.
    splits = {'train': train, 'validation': validation}
    return {name: self._generate_examples(files) for name, files in splits.items() if files}

  def _generate_examples(self, relative_paths):
    root = pathlib.Path(self.builder_config.source_dir)
    for i, rel in enumerate(relative_paths):
      text = (root / rel).read_bytes().decode('utf-8', errors='replace')
      if text.strip():
        yield i, {'text': text, 'path': rel}


class _DropExpectedWarnings(logging.Filter):
  """Drops TFDS warnings that every `text_dir` build triggers by design."""

  _EXPECTED = ('Using custom data configuration', 'Variant folder')

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(self._EXPECTED)


@contextlib.contextmanager
def _quiet():
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
    data_dir: TFDS data directory; the data lands in `text_dir/<config name>/1.0.0/`.

  Returns:
    The builder; read with `builder.as_data_source(split='train')` (records are dicts with
    `text` and `path` as UTF-8 `bytes`).
  """
  config = make_config(source_dir, glob, validation_percent)
  default = TextDir.BUILDER_CONFIGS[0]
  if config.name == default.name:
    config = default  # TFDS rejects a custom config that shares a predefined config's name
  with _quiet():
    builder = TextDir(config=config, data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare(
          file_format='array_record',
          download_config=tfds.download.DownloadConfig(
              compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return builder
