"""Tests for the `text_dir` TFDS builder: exact contents, split rule, determinism, defaults."""

import os
import pathlib
import shutil
import sysconfig
import tempfile
from unittest import mock
import zlib

from absl.testing import absltest
from absl.testing import parameterized

from longjax.data.builders import text_dir


def _write(root, rel, data):
  path = pathlib.Path(root, rel)
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(data, str):
    data = data.encode('utf-8')
  path.write_bytes(data)


def _make_source(root, n=40):
  """A small tree of files, including the cases the builder must skip or repair."""
  for i in range(n):
    text = f'# module {i} é😀\nx = {i}\n' * (i + 1)
    _write(root, f'pkg{i % 3}/sub{i % 2}/mod_{i:02d}.py', text)
  _write(root, 'empty.py', '')
  _write(root, 'blank.py', '  \n\n')
  _write(root, 'latin1.py', 'caf\xe9 = 1\n'.encode('latin-1'))  # not valid UTF-8: skipped
  _write(root, 'binary.py', b'\x7fELF\0\0\x01')  # valid UTF-8, but a NUL byte: skipped
  _write(root, 'notes.txt', 'not python\n')
  _write(root, 'venv/lib/site-packages/dep.py', 'import os\n')
  _write(root, 'dist-packages/dep2.py', 'import sys\n')


def _expected(root):
  """What the builder should hold, computed with os.walk independently of the builder."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in ('site-packages', 'dist-packages')]
    for name in filenames:
      if not name.endswith('.py'):
        continue
      full = os.path.join(dirpath, name)
      with open(full, 'rb') as f:
        data = f.read()
      try:
        text = data.decode('utf-8')
      except UnicodeDecodeError:
        continue  # not text: skipped
      if text.strip() and '\0' not in text:
        out[os.path.relpath(full, root).replace(os.sep, '/')] = text
  return out


def _read(builder, split):
  """[(path, text)] of a split in stored order, or [] if the split was not generated."""
  if split not in builder.info.splits:
    return []
  source = builder.as_data_source(split=split)
  return [(r['path'].decode('utf-8'), r['text'].decode('utf-8')) for r in source]


class TextDirTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.source = os.path.join(cls._tmp.name, 'my-src')
    _make_source(cls.source)
    cls.percent = 30
    cls.builders = [
        text_dir.load_text_dir(source_dir=cls.source, validation_percent=cls.percent,
                               data_dir=os.path.join(cls._tmp.name, f'data{i}'))
        for i in range(2)
    ]

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def test_reads_back_exact_text_sorted_by_path(self):
    expected = _expected(self.source)
    records = _read(self.builders[0], 'train') + _read(self.builders[0], 'validation')
    self.assertEqual(dict(records), expected)
    for split in ('train', 'validation'):
      paths = [p for p, _ in _read(self.builders[0], split)]
      self.assertEqual(paths, sorted(paths))

  def test_every_file_in_exactly_one_split_by_crc32_of_path(self):
    train = [p for p, _ in _read(self.builders[0], 'train')]
    validation = [p for p, _ in _read(self.builders[0], 'validation')]
    self.assertEmpty(set(train) & set(validation))
    self.assertCountEqual(train + validation, _expected(self.source))
    for path in validation:
      self.assertLess(zlib.crc32(path.encode()) % 100, self.percent)
    for path in train:
      self.assertGreaterEqual(zlib.crc32(path.encode()) % 100, self.percent)
    # The rule must put some of these 41 files on each side, or the test proves little.
    self.assertNotEmpty(validation)
    self.assertGreater(len(train), len(validation))

  def test_two_builds_are_identical(self):
    for split in ('train', 'validation'):
      self.assertEqual(_read(self.builders[0], split), _read(self.builders[1], split))

  def test_split_is_by_file_not_by_corpus(self):
    # A bigger copy of the source: the files both share must land on the same side.
    with tempfile.TemporaryDirectory() as tmp:
      bigger = os.path.join(tmp, 'bigger')
      shutil.copytree(self.source, bigger)
      for i in range(30):
        _write(bigger, f'extra/new_{i}.py', f'y = {i}\n')
      builder = text_dir.load_text_dir(source_dir=bigger, validation_percent=self.percent,
                                       data_dir=os.path.join(tmp, 'data'))
      old_val = {p for p, _ in _read(self.builders[0], 'validation')}
      new_val = {p for p, _ in _read(builder, 'validation')}
      self.assertEqual(new_val - {p for p in new_val if p.startswith('extra/')}, old_val)

  def test_second_load_reuses_the_build(self):
    data_dir = os.path.join(self._tmp.name, 'data0')
    files = sorted(pathlib.Path(data_dir).rglob('*.array_record*'))
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = text_dir.load_text_dir(source_dir=self.source, validation_percent=self.percent,
                                   data_dir=data_dir)
    self.assertEqual([f.stat().st_mtime_ns for f in files], mtimes)
    self.assertEqual(_read(again, 'train'), _read(self.builders[0], 'train'))

  def test_zero_percent_has_only_train(self):
    with tempfile.TemporaryDirectory() as tmp:
      builder = text_dir.load_text_dir(source_dir=self.source, validation_percent=0,
                                       data_dir=tmp)
      self.assertEqual(set(builder.info.splits), {'train'})
      self.assertLen(_read(builder, 'train'), len(_expected(self.source)))

  def test_empty_match_raises(self):
    with tempfile.TemporaryDirectory() as tmp:
      with self.assertRaisesRegex(text_dir.SourceError, 'no file under .* matches'):
        text_dir.load_text_dir(source_dir=self.source, glob='**/*.rs', data_dir=tmp)
      self.assertEqual(os.listdir(tmp), [])  # nothing half-built is left behind

  def test_sources_that_cannot_make_both_splits_raise_before_writing(self):
    with tempfile.TemporaryDirectory() as tmp:
      blank = os.path.join(tmp, 'blank')
      _write(blank, 'a.py', '  \n\t\n')
      _write(blank, 'b.py', b'\xff\xfe binary')
      one = os.path.join(tmp, 'one')
      _write(one, 'c.py', 'x = 1\n')  # crc32('c.py') % 100 = 65: a train file at 5%
      data = os.path.join(tmp, 'data')
      for source, message in ((blank, r'0 usable file\(s\) .* none in the train split'),
                              (one, r'1 usable file\(s\) .* none in the validation split')):
        with self.assertRaisesRegex(text_dir.SourceError, message):
          text_dir.load_text_dir(source_dir=source, validation_percent=5, data_dir=data)
      self.assertFalse(os.path.exists(data))

  def test_binary_files_are_counted_in_the_error_and_the_warning(self):
    with tempfile.TemporaryDirectory() as tmp:
      binary = os.path.join(tmp, 'binary')
      _write(binary, 'a.py', b'\x7fELF\0\0\x01')
      _write(binary, 'b.py', b'caf\xe9 = 1\n')
      _write(binary, 'c.py', '\n')
      data = os.path.join(tmp, 'data')
      # All binary: the error says why nothing is usable, not merely that nothing is.
      with self.assertRaisesRegex(text_dir.SourceError,
                                  r'^0 usable file\(s\) \(skipped: 2 binary, 1 empty or '
                                  r'whitespace-only\) matching .* none in the train split'):
        text_dir.load_text_dir(source_dir=binary, validation_percent=5, data_dir=data)
      self.assertFalse(os.path.exists(data))
      # A usable source: the build goes on and the warning counts the binaries.
      with self.assertLogs('absl', 'WARNING') as logs:
        text_dir.load_text_dir(source_dir=self.source, validation_percent=self.percent,
                               data_dir=data)
      self.assertRegex('\n'.join(logs.output),
                       r'skipped 2 of 44 files under .*my-src as binary \(not UTF-8 text, or '
                       r'holding a NUL byte\)')

  def test_unreadable_file_raises(self):
    # Tests run as root, which reads any file: the error is injected.
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(
        pathlib.Path, 'read_bytes', side_effect=PermissionError(13, 'Permission denied')):
      with self.assertRaisesRegex(text_dir.SourceError, r'cannot read .*\(Permission denied\)'):
        text_dir.load_text_dir(source_dir=self.source, data_dir=tmp)


class ConfigTest(absltest.TestCase):

  def test_names_differ_by_every_parameter(self):
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
      names = {
          text_dir.make_config(a).name,
          text_dir.make_config(b).name,
          text_dir.make_config(a, glob='**/*.txt').name,
          text_dir.make_config(a, validation_percent=10).name,
          text_dir.make_config().name,
      }
      self.assertLen(names, 5)
      self.assertEqual(text_dir.make_config(a).name, text_dir.make_config(a + '/').name)

  def test_default_source_is_this_interpreters_stdlib(self):
    config = text_dir.make_config()
    stdlib = os.path.realpath(sysconfig.get_paths()['stdlib'])
    self.assertEqual(config.source_dir, stdlib)
    self.assertTrue(os.path.isfile(os.path.join(stdlib, 'os.py')))
    self.assertRegex(config.name, r'^stdlib_[0-9a-f]{10}$')
    self.assertEqual(text_dir.TextDir.BUILDER_CONFIGS[0].name, config.name)

  def test_readable_prefix(self):
    with tempfile.TemporaryDirectory() as tmp:
      src = os.path.join(tmp, 'My Corpus-2')
      os.mkdir(src)
      self.assertRegex(text_dir.make_config(src).name, r'^my_corpus_2_[0-9a-f]{10}$')


class StdlibTest(absltest.TestCase):
  """The default corpus, built once (about 2 s for ~1800 files)."""

  def test_full_default_build_matches_the_stdlib(self):
    stdlib = sysconfig.get_paths()['stdlib']
    expected = _expected(stdlib)
    with tempfile.TemporaryDirectory() as tmp:
      builder = text_dir.load_text_dir(data_dir=tmp)
      self.assertEqual(builder.builder_config.name, text_dir.make_config().name)
      counts = {name: split.num_examples for name, split in builder.info.splits.items()}
      self.assertEqual(sum(counts.values()), len(expected))
      # About 5 % of the files go to validation.
      self.assertBetween(counts['validation'] / len(expected), 0.03, 0.08)
      source = builder.as_data_source(split='validation')
      for record in source:
        path = record['path'].decode('utf-8')
        self.assertNotIn('site-packages', path)
        self.assertEqual(record['text'].decode('utf-8'), expected[path])


if __name__ == '__main__':
  absltest.main()
