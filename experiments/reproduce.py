"""Reproduce a published length-extrapolation finding: train, evaluate, PASS/FAIL per claim.

  python -m experiments.reproduce --list
  python -m experiments.reproduce --study=nope_reasoning --workdir=runs/nope_reasoning \
      [--size=smoke|cpu|full] [--variants=nope,rope]

Writes WORKDIR/results.json, WORKDIR/report.md and WORKDIR/plots/; each variant is a run in
WORKDIR/variants/NAME. Rerunning the same command resumes: finished variants are not retrained.
The studies are configs/studies/*.py; docs/studies.md has their results.
"""

from absl import app
from absl import flags

from experiments import common

_STUDY = flags.DEFINE_string("study", None, "Study name (see --list).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the study's runs and report.")
_SIZE = flags.DEFINE_enum("size", "cpu", ["smoke", "cpu", "full"],
                          "smoke: seconds (tests); cpu: <= ~20 min on 2 cores; full: the paper's.")
_VARIANTS = flags.DEFINE_list("variants", [], "Run only these variants (no report).")
_LIST = flags.DEFINE_bool("list", False, "Print one study per line with its claim, and exit.")
_DOCS = flags.DEFINE_string("docs", "", "Also publish the results into this docs/studies.md "
                            "(its section, docs/studies/NAME.json, the plots).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from configs import studies  # pylint: disable=g-import-not-at-top (fast --help)
  if _LIST.value:
    for name in studies.names():
      print(f"{name:<22} {studies.load(name).claim}")
    return
  if not _STUDY.value or not _WORKDIR.value:
    common.fail("--study and --workdir are required (or --list)")
  try:
    study = studies.load(_STUDY.value)
  except ValueError as e:
    common.fail(f"--study: {e}")
  common.start()
  from longjax.studies import report, runner  # pylint: disable=g-import-not-at-top
  try:
    with common.training_errors():
      document = runner.run_study(study, _WORKDIR.value, size=_SIZE.value,
                                  only=_VARIANTS.value or None)
  except runner.StudyError as e:
    common.fail(str(e))
  if document is None:
    return
  print(study.table(document["summary"]))
  for line in report.verdict_lines(document):
    print(line)
  print(f"report: {_WORKDIR.value}/report.md")
  if _DOCS.value:
    from longjax.studies import docs  # pylint: disable=g-import-not-at-top
    docs.publish(_WORKDIR.value, _DOCS.value, study.table)
    print(f"published into {_DOCS.value}")


if __name__ == "__main__":
  common.run(main)
