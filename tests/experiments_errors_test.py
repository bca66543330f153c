"""Bad input to every entry point: exactly one error line, no traceback, the exit code, and the
run directory byte-for-byte as it was (issue 19's table of user mistakes)."""

import os
import re
import shutil
import subprocess
import tempfile

from absl.testing import absltest
from absl.testing import parameterized

from tests import testing

_TRAIN = ("experiments.train", "--config=configs/quickstart.py:tiny")
_EVALUATE = ("experiments.evaluate",)
_SAMPLE = ("experiments.sample",)
# Evaluation and sampling with an explicit config instead of the run's saved one.
_EVALUATE_TINY = ("experiments.evaluate", _TRAIN[1])
_SAMPLE_TINY = ("experiments.sample", _TRAIN[1])
_REPORT = ("experiments.report",)
_BENCHMARK = ("experiments.benchmark",)
_REPRODUCE = ("experiments.reproduce",)

# (name, entry point, arguments, expected error regex, exit code). In the arguments {wd} is a
# path that does not exist yet, {run} a copy of a trained run, {tmp} the case's own folder and
# {src:NAME} a source folder of `_SOURCES`; cases given configs/quickstart.py:tiny (all train
# cases) also get the test corpus (`_data`).
_CASES = (
    # The config file and its flags.
    ("unknown_field", _TRAIN, ["--config.model.widht=3"],
     r"--config\.model\.widht: no config field 'widht' \(did you mean \"width\"", 2),
    ("unknown_nested_field", _TRAIN, ["--config.model.posenc.knd=rope"],
     r"--config\.model\.posenc\.knd: no config field 'knd' \(did you mean \"kind\"", 2),
    ("unknown_section", _TRAIN, ["--config.modl.width=3"],
     r"--config\.modl\.width: no config field 'modl' \(did you mean \"model\"", 2),
    ("field_of_wrong_type", _TRAIN, ["--config.model.width=abc"],
     r"--config\.model\.width=abc: invalid literal for int", 2),
    ("missing_config_file", ("experiments.train", "--config=configs/nope.py"), [],
     r"--config=configs/nope\.py: .*No such file", 2),
    ("config_syntax_error", ("experiments.train", "--config={tmp}/syntax.py"), [],
     r"--config=.*syntax\.py: SyntaxError: invalid syntax", 2),
    ("config_without_get_config", ("experiments.train", "--config={tmp}/noget.py"), [],
     r"--config=.*noget\.py: the file defines no get_config", 2),
    ("unknown_config_variant", ("experiments.train", "--config=configs/quickstart.py:huge"), [],
     r"configs/quickstart\.py: unknown argument 'huge'; valid: '' or 'tiny'", 2),
    ("unknown_flag", _TRAIN, ["--stepz=3"], r"Unknown command line flag 'stepz'", 2),
    # Model fields.
    ("unknown_posenc", _TRAIN, ["--config.model.posenc.kind=bogus"],
     r"model\.posenc\.kind='bogus': unknown choice \(valid: .*rope", 2),
    ("unknown_impl", _TRAIN, ["--config.model.attention.impl=bogus"],
     r"model\.attention\.impl='bogus': unknown choice \(valid: .*blockwise", 2),
    ("unknown_mixer", _TRAIN, ["--config.model.mixers=bogus"], r"model\.mixers='bogus'", 2),
    ("unknown_dtype", _TRAIN, ["--config.model.dtype=float8"],
     r"model\.dtype='float8': unknown choice", 2),
    ("unknown_remat", _TRAIN, ["--config.model.remat=bogus"],
     r"model\.remat='bogus': unknown choice", 2),
    ("heads_not_dividing_width", _TRAIN, ["--config.model.num_heads=3"],
     r"model\.num_heads=3: must divide model\.width=64", 2),
    ("kv_heads_not_dividing", _TRAIN, ["--config.model.num_kv_heads=3"],
     r"model\.num_kv_heads=3: must divide model\.num_heads=2", 2),
    ("negative_head_dim", _TRAIN, ["--config.model.head_dim=-8"],
     r"model\.head_dim=-8: must be >= 0", 2),
    ("zero_layers", _TRAIN, ["--config.model.num_layers=0"],
     r"model\.num_layers=0: must be positive", 2),
    ("unknown_scaling", _TRAIN, ["--config.model.posenc.scaling=bogus"],
     r"model\.posenc\.scaling='bogus': unknown choice", 2),
    ("negative_window", _TRAIN, ["--config.model.attention.window=-1"],
     r"model\.attention\.window=-1: must be >= 0", 2),
    ("sinks_without_window", _TRAIN, ["--config.model.attention.sink_tokens=4"],
     r"model\.attention\.sink_tokens=4: .*only with model\.attention\.window > 0", 2),
    # Training fields.
    ("zero_steps", _TRAIN, ["--config.train.steps=0"], r"train\.steps=0: must be positive", 2),
    ("zero_batch", _TRAIN, ["--config.train.batch_size=0"],
     r"train\.batch_size=0: must be positive", 2),
    ("negative_learning_rate", _TRAIN, ["--config.train.learning_rate=-1"],
     r"train\.learning_rate=-1\.0: must be positive", 2),
    ("zero_eval_batches", _TRAIN, ["--config.train.eval_batches=0"],
     r"train\.eval_batches=0: must be positive", 2),
    ("b2_above_one", _TRAIN, ["--config.train.b2=1.5"], r"train\.b2=1\.5: must be in \[0, 1\)",
     2),
    ("negative_b1", _TRAIN, ["--config.train.b1=-0.1"], r"train\.b1=-0\.1: must be in \[0, 1\)",
     2),
    ("negative_grad_clip", _TRAIN, ["--config.train.grad_clip=-1"],
     r"train\.grad_clip=-1\.0: must be positive", 2),
    ("zero_eps", _TRAIN, ["--config.train.eps=0"], r"train\.eps=0\.0: must be positive", 2),
    ("negative_weight_decay", _TRAIN, ["--config.train.weight_decay=-1"],
     r"train\.weight_decay=-1\.0: must be >= 0", 2),
    ("min_lr_ratio_above_one", _TRAIN, ["--config.train.min_lr_ratio=2"],
     r"train\.min_lr_ratio=2\.0: must be in \[0, 1\]", 2),
    ("negative_warmup", _TRAIN, ["--config.train.warmup_steps=-1"],
     r"train\.warmup_steps=-1: must be >= 0", 2),
    ("negative_eval_every", _TRAIN, ["--config.train.eval_every=-1"],
     r"train\.eval_every=-1: must be >= 0", 2),
    ("batch_not_divisible", _TRAIN, ["--config.train.batch_size=3", "--config.mesh.data=2"],
     r"mesh", 2),
    ("unparsable_eval_lengths", _TRAIN, ["--config.eval.lengths=abc"],
     r"eval\.lengths='abc': cannot parse 'abc'", 2),
    ("zero_mesh_axis", _TRAIN, ["--config.mesh.data=0"], r"mesh\.data=0: must be positive", 2),
    # Data.
    ("unknown_tokenizer", _TRAIN, ["--config.data.tokenizer=bogus"],
     r"data\.tokenizer='bogus': unknown choice", 2),
    ("validation_percent_zero", _TRAIN, ["--config.data.validation_percent=0"],
     r"data\.validation_percent=0: must be in 1\.\.99", 2),
    ("source_not_a_directory", _TRAIN, ["--config.data.source_dir={tmp}/syntax.py"],
     r"data\.source_dir=.*: is not a directory", 2),
    ("empty_source_dir", _TRAIN, ["--config.data.source_dir={src:empty}"],
     r"no file under .*empty matches '\*\*/\*\.py' \(data\.source_dir, data\.glob\)", 2),
    ("glob_matching_nothing", _TRAIN, ["--config.data.glob=**/*.zzz"],
     r"no file under .* matches '\*\*/\*\.zzz'", 2),
    ("whitespace_only_files", _TRAIN, ["--config.data.source_dir={src:blank}"],
     r"0 usable file\(s\) .* none in the train split", 2),
    ("binary_files_only", _TRAIN, ["--config.data.source_dir={src:binary}"],
     r"0 usable file\(s\) \(skipped: 2 binary\) .* none in the train split", 2),
    ("corpus_too_small_for_a_split", _TRAIN, ["--config.data.source_dir={src:one}"],
     r"1 usable file\(s\) .* none in the validation split", 2),
    # The run directory.
    ("workdir_is_a_file", _TRAIN, ["--workdir={tmp}/syntax.py"], r"is a file, not a directory",
     2),
    ("workdir_under_a_file", _TRAIN, ["--workdir={tmp}/syntax.py/run"],
     r"cannot be created: .*syntax\.py is a file", 2),
    ("empty_workdir_flag", _TRAIN, ["--workdir="], r"--workdir is empty", 2),
    ("resume_with_other_width", _TRAIN, ["--workdir={run}", "--config.model.width=128"],
     r"holds checkpoints of a run with another config \(.*model\.width=64 in the run, 128 now", 2),
    ("resume_with_other_posenc", _TRAIN, ["--workdir={run}", "--config.model.posenc.kind=alibi"],
     r"model\.posenc\.kind='rope' in the run, 'alibi' now", 2),
    ("resume_with_other_seq_len", _TRAIN, ["--workdir={run}", "--config.data.seq_len=64"],
     r"data\.seq_len=32 in the run, 64 now", 2),
    ("every_checkpoint_unrestorable", _TRAIN, ["--workdir={run:broken}"],
     r"no checkpoint in .* can be restored \(step 6: .*; step 3: .*\)\. Nothing was moved", 2),
    # Evaluation, sampling, reports and benchmarks.
    ("evaluate_not_a_run", _EVALUATE, ["--workdir={src:empty}"],
     r"is not a longjax run directory \(it has no config\.json\)", 2),
    ("evaluate_not_a_run_with_config", _EVALUATE,
     ["--workdir={src:empty}", "--config=configs/quickstart.py:tiny"],
     r"no checkpoint in .*checkpoints: is .* a trained run\?", 2),
    ("evaluate_corrupt_config_json", _EVALUATE, ["--workdir={run:bad_json}"],
     r"config\.json is not valid JSON \(Expecting property name .* line 1 column 2\)", 2),
    ("evaluate_corrupt_config_json_with_config", _EVALUATE_TINY, ["--workdir={run:bad_json}"],
     r"config\.json is not valid JSON \(Expecting property name .* line 1 column 2\)", 2),
    ("evaluate_override_changing_shapes", _EVALUATE, ["--workdir={run}",
                                                      "--config.model.width=128"],
     r"other parameter shapes \(model\.width=64 in the run, 128 now\)", 2),
    ("evaluate_unknown_method", _EVALUATE, ["--workdir={run}", "--compare=none,bogus"],
     r"--compare: unknown method\(s\) bogus; valid: ", 2),
    ("evaluate_missing_step", _EVALUATE, ["--workdir={run}", "--step=999"],
     r"no checkpoint of step 999 in .* \(it has 3, 6\)", 2),
    ("evaluate_unparsable_lengths", _EVALUATE, ["--workdir={run}", "--config.eval.lengths=x"],
     r"eval\.lengths='x': cannot parse", 2),
    ("sample_not_a_run", _SAMPLE, ["--workdir={src:empty}"], r"is not a longjax run directory",
     2),
    ("sample_corrupt_config_json", _SAMPLE, ["--workdir={run:bad_json}"],
     r"config\.json is not valid JSON", 2),
    ("sample_corrupt_config_json_with_config", _SAMPLE_TINY, ["--workdir={run:bad_json}"],
     r"config\.json is not valid JSON", 2),
    ("sample_override_changing_shapes", _SAMPLE, ["--workdir={run}", "--config.model.width=128"],
     r"other parameter shapes", 2),
    ("sample_too_many_tokens", _SAMPLE, ["--workdir={run}", "--max_new_tokens=100000000000"],
     r"--max_new_tokens=100000000000 needs a .* GiB decode cache .* more than half of this", 2),
    ("sample_negative_temperature", _SAMPLE, ["--workdir={run}", "--temperature=-1"],
     r"need --max_new_tokens >= 1, --temperature >= 0", 2),
    ("report_missing_workdir", _REPORT, ["--workdir={wd}"], r"--workdir=.* does not exist", 2),
    ("report_without_results", _REPORT, ["--workdir={src:empty}"],
     r"has no eval/perplexity\.json: run python -m experiments\.train", 2),
    ("report_compare_without_results", _REPORT, ["--workdir={run}", "--compare"],
     r"has no eval/compare\.json: run python -m experiments\.evaluate --compare", 2),
    ("report_missing_benchmarks_file", _REPORT, ["--benchmarks={tmp}/nope.json"],
     r"--benchmarks: no such file .*nope\.json", 2),
    ("benchmark_unknown_suite", _BENCHMARK, ["--suite=nope"], r"--suite=nope: value should be",
     2),
    # Synthetic tasks and studies.
    ("task_unknown", _TRAIN, ["--config.task.name=bogus"],
     r"task\.name='bogus': unknown task \(valid: addition, copy", 2),
    ("task_too_long_for_seq_len", _TRAIN, ["--config.task.name=copy",
                                           "--config.task.train_sizes=1-40"],
     r"data\.seq_len=32: the longest copy example .* has 83 tokens; need data\.seq_len >= 82", 2),
    ("task_bad_sizes", _TRAIN, ["--config.task.name=copy", "--config.task.train_sizes=9-2"],
     r"task\.train_sizes='9-2': cannot parse '9-2'", 2),
    ("reproduce_unknown_study", _REPRODUCE, ["--study=bogus"],
     r"--study: unknown study 'bogus'; valid: .*nope_reasoning", 2),
    ("reproduce_unknown_variant", _REPRODUCE, ["--study=nope_reasoning", "--variants=copy_bogus"],
     r"study nope_reasoning has no variant 'copy_bogus'; valid: copy_nope", 2),
    ("reproduce_unknown_size", _REPRODUCE, ["--study=nope_reasoning", "--size=huge"],
     r"--size=huge: value should be one of", 2),
    ("reproduce_workdir_of_another_study", _REPRODUCE,
     ["--study=nope_reasoning", "--workdir={src:study}"],
     r"holds the cpu run of study other; use another --workdir for the cpu run of "
     r"nope_reasoning", 2),
)

_SOURCES = {
    "empty": {},
    "blank": {"a.py": b"  \n\t\n", "b.py": b"\n"},
    "binary": {"a.py": b"\x7fELF\x00\x00\x01", "b.py": b"caf\xe9 = 1\n"},
    "one": {"c.py": b"x = 1\n"},  # crc32('c.py') % 100 = 65: train at 5 (or 20) percent
    "study": {"study.json": b'{"study": "other", "size": "cpu"}'},
}


def _data(tmp, args):
  """The test corpus flags of train cases; a case that names its own source also gets a dataset
  cache of its own, checked to stay empty."""
  flags = testing.cli_overrides(testing.tiny_config())
  if any(a.startswith(("--config.data.source_dir=", "--config.data.glob=")) for a in args):
    flags = [f for f in flags if not f.startswith("--config.data.tfds_dir=")]
    flags.append(f"--config.data.tfds_dir={tmp}/tfds")
  return flags


class EntryPointErrorsTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._root = tempfile.mkdtemp(dir=absltest.get_default_test_tmpdir())
    for name, files in _SOURCES.items():
      os.makedirs(os.path.join(cls._root, name))
      for rel, data in files.items():
        with open(os.path.join(cls._root, name, rel), "wb") as f:
          f.write(data)

  def _expand(self, arg, tmp):
    def run(kind):
      workdir = testing.copy_of_trained_run(tempfile.mkdtemp(dir=tmp))
      if kind == "broken":
        for step in (3, 6):
          shutil.rmtree(os.path.join(workdir, "checkpoints", str(step), "state"))
      elif kind == "bad_json":
        with open(os.path.join(workdir, "config.json"), "w") as f:
          f.write("{bad")
      return workdir
    arg = re.sub(r"\{run(?::(\w+))?\}", lambda m: run(m.group(1)), arg)
    arg = re.sub(r"\{src:(\w+)\}", lambda m: os.path.join(self._root, m.group(1)), arg)
    return arg.replace("{wd}", os.path.join(tmp, "new_run")).replace("{tmp}", tmp)

  @parameterized.named_parameters(*((c[0],) + c[1:] for c in _CASES))
  def test_one_error_line(self, command, args, pattern, code):
    tmp = self.create_tempdir().full_path
    with open(os.path.join(tmp, "syntax.py"), "w") as f:
      f.write("def get_config(:\n")
    with open(os.path.join(tmp, "noget.py"), "w") as f:
      f.write("X = 1\n")
    command = [self._expand(a, tmp) for a in command]
    args = [self._expand(a, tmp) for a in args]
    if command[1:] == list(_TRAIN[1:]):
      args = _data(tmp, args) + args
    if not any(a.startswith("--workdir") for a in args) and command[0] != "experiments.report":
      args.append(f"--workdir={tmp}/new_run")
    # Every folder the command may be given is checked for changes, and the dataset cache.
    watched = [a.split("=", 1)[1] for a in args if a.startswith("--workdir=")]
    watched = [w for w in watched if w] + [self._root]
    before = {w: testing.tree_bytes(w) if os.path.isdir(w) else os.path.exists(w)
              for w in watched}
    done = testing.run_module(*command, *args, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    self.assertEqual(done.returncode, code, done.stderr[-3000:])
    self.assertLen(lines, 1, done.stderr[-3000:])
    self.assertTrue(lines[0].startswith("error: ") or "FATAL Flags" in lines[0], lines[0])
    self.assertRegex(lines[0], pattern)
    for w in watched:
      self.assertEqual(testing.tree_bytes(w) if os.path.isdir(w) else os.path.exists(w),
                       before[w], f"{w} changed")
    self.assertFalse(os.path.exists(os.path.join(tmp, "tfds", "text_dir")),
                     "a dataset was left in the cache")

  def test_server_runs_what_python_dash_m_runs(self):
    # The fork server against a process started from scratch, on a case that reads a config,
    # validates it and writes nothing: the same exit code, the same output.
    tmp = self.create_tempdir().full_path
    argv = [*_TRAIN, *_data(tmp, []), "--config.train.steps=0", f"--workdir={tmp}/run"]
    served = testing.run_module(*argv, timeout=300)
    started = subprocess.run([testing.PYTHON, "-m", *argv], cwd=testing.REPO_ROOT,
                             env=testing.python_env(), capture_output=True, text=True,
                             timeout=300, check=False)
    self.assertEqual(served.returncode, 2)
    self.assertEqual((served.returncode, served.stdout, served.stderr),
                     (started.returncode, started.stdout, started.stderr))

  def test_there_are_at_least_fifty_cases(self):
    self.assertGreaterEqual(len(_CASES), 50)
    self.assertEqual({c[1][0] for c in _CASES},
                     {"experiments.train", "experiments.evaluate", "experiments.sample",
                      "experiments.report", "experiments.benchmark", "experiments.reproduce"})


if __name__ == "__main__":
  absltest.main()
