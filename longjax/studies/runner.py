"""Runs a study: trains and evaluates each variant, then writes results.json, plots, report.md.

Layout of a study's workdir:

  study.json              {study, size}: a workdir holds one study at one size
  variants/<name>/        one run per trained variant (`experiments.train` layout), resumable;
                          an evaluation-only variant (`{"eval_of": base, ...}`: the base's
                          checkpoint evaluated with the other fields changed, e.g. a retrieval
                          policy) writes `eval/<task>-<name>.json` into its base's directory
  results.json            every variant's evaluation, the summary, the verdict per claim
  plots/  report.md

Nothing is lost on interruption: a finished variant (trained to `train.steps` with its
evaluation written) is not retrained when the study runs again, an interrupted one resumes from
its last checkpoint, and results.json is written (atomically) only once every variant is done.
The time each variant took is kept in its directory (`study_seconds.json`), summed over the
sessions that ran it.
"""

from __future__ import annotations

import json
import os
import time

import jax

from longjax import configuration, experiment
from longjax.benchmarks import machine
from longjax.eval import harness
from longjax.studies import report
from longjax.studies.study import SIZES, Study, check_criteria


class StudyError(ValueError):
  """A study cannot run as asked (bad size or variant, a workdir of another study); one line."""


def variant_configs(study: Study, size: str, only: list[str] | None = None) -> dict:
  """{variant: its full run config} at `size`, optionally only the variants named in `only`."""
  if size not in SIZES:
    raise StudyError(f"unknown size {size!r}; valid: {', '.join(SIZES)}")
  variants = study.variants(size)
  unknown = [v for v in only or () if v not in variants]
  if unknown:
    raise StudyError(f"study {study.name} has no variant {', '.join(map(repr, unknown))}; "
                     f"valid: {', '.join(variants)}")
  configs = {}
  for name, overrides in variants.items():
    overrides = dict(overrides)
    base = overrides.pop(EVAL_OF, None)
    if base is not None and (base not in variants or EVAL_OF in variants[base]):
      raise StudyError(f"study {study.name}, variant {name}: eval_of={base!r} is not a trained "
                       "variant")
    config = study.config(size)
    try:
      if base is not None:
        config.update_from_flattened_dict(dict(variants[base]))
      config.update_from_flattened_dict(overrides)
    except (KeyError, AttributeError) as e:
      raise StudyError(f"study {study.name}, variant {name}: no config field {e}") from None
    if not only or name in only or any(variants[v].get(EVAL_OF) == name for v in only):
      configs[name] = (config, base)
  return configs


EVAL_OF = "eval_of"  # a variant's key naming the trained variant whose checkpoint it evaluates


def _claim_workdir(study: Study, size: str, workdir: str) -> None:
  path = os.path.join(workdir, "study.json")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      held = json.load(f)
    if (held["study"], held["size"]) != (study.name, size):
      raise StudyError(f"{workdir} holds the {held['size']} run of study {held['study']}; "
                       f"use another --workdir for the {size} run of {study.name}")
    return
  os.makedirs(workdir, exist_ok=True)
  harness.write_json(path, {"study": study.name, "size": size})


def _seconds(variant_dir: str) -> float:
  path = os.path.join(variant_dir, "study_seconds.json")
  if not os.path.exists(path):
    return 0.0
  with open(path, encoding="utf-8") as f:
    return float(json.load(f)["seconds"])


def run_variant(config, variant_dir: str, *, progress: bool = True) -> dict | None:
  """Trains (or resumes) and evaluates one variant; returns {eval task: result}, or None when
  it was interrupted (its checkpoint saved)."""
  tasks = harness.run_tasks(config)
  start = time.perf_counter()
  result = experiment.train_and_evaluate(config, variant_dir, progress=progress)
  spent = time.perf_counter() - start
  if not result.already_complete:
    harness.write_json(os.path.join(variant_dir, "study_seconds.json"),
                       {"seconds": _seconds(variant_dir) + spent})
  if result.interrupted:
    return None
  out = {}
  for task in tasks:
    with open(os.path.join(variant_dir, "eval", f"{task}.json"), encoding="utf-8") as f:
      out[task] = json.load(f)
  return out


def evaluate_variant(name: str, config, base_dir: str, *,
                     progress: bool = True) -> tuple[dict, float]:
  """Evaluates the trained run in `base_dir` under `config` (labelled `name`), unless its
  results are there; returns ({eval task: result}, seconds the evaluation took)."""
  tasks = harness.run_tasks(config)
  paths = {t: os.path.join(base_dir, "eval", f"{t}-{name}.json") for t in tasks}
  timing = os.path.join(base_dir, "eval", f"study_seconds-{name}.json")
  if not all(map(os.path.exists, paths.values())):
    from longjax import runs  # pylint: disable=g-import-not-at-top (loads the model code)
    start = time.perf_counter()
    run = runs.load_run(base_dir, config)
    harness.evaluate(harness.EvalContext(
        config=run.config, graphdef=run.graphdef, params=run.params, corpus=run.corpus,
        workdir=base_dir, label=name, progress=progress), tasks)
    harness.write_json(timing, {"seconds": time.perf_counter() - start})
  out = {}
  for task, path in paths.items():
    with open(path, encoding="utf-8") as f:
      out[task] = json.load(f)
  with open(timing, encoding="utf-8") as f:
    return out, float(json.load(f)["seconds"])


def run_study(study: Study, workdir: str, *, size: str = "cpu", only: list[str] | None = None,
              progress: bool = True, log=print) -> dict | None:
  """Runs `study` at `size` in `workdir` (see the module docstring).

  Args:
    study: the study.
    workdir: its directory.
    size: smoke | cpu | full.
    only: run only these variants (results.json and the verdicts need every variant, so they
      are written only when all are done).
    progress: progress bars.
    log: where one line per variant goes.

  Returns:
    The results (as written to results.json), or None when a variant was interrupted or only
    some variants were asked for.

  Raises:
    StudyError: a bad size or variant name, or a workdir of another study (nothing written).
    ConfigError, ResumeError, ...: from a variant's training, before that variant writes.
  """
  configs = variant_configs(study, size, only)
  for name, (config, _) in configs.items():  # every variant's config, before anything runs
    try:
      configuration.checked(config, jax.device_count())
    except configuration.ConfigError as e:
      raise StudyError(f"study {study.name}, variant {name}: {e}") from None
  _claim_workdir(study, size, workdir)
  results, seconds = {}, {}
  for i, (name, (config, base)) in enumerate(configs.items()):
    log(f"[{i + 1}/{len(configs)}] {study.name}/{name}")
    if base is None:
      variant_dir = os.path.join(workdir, "variants", name)
      out = run_variant(config, variant_dir, progress=progress)
      if out is None:
        log(f"interrupted in variant {name}; rerun the same command to resume")
        return None
      results[name], seconds[name] = out, _seconds(variant_dir)
    else:
      results[name], seconds[name] = evaluate_variant(
          name, config, os.path.join(workdir, "variants", base), progress=progress)
  if only:
    return None
  summary = study.summarize(results)
  verdicts = check_criteria(study.criteria, summary)
  plot_dir = os.path.join(workdir, "plots")
  document = {
      "study": study.name, "title": study.title, "paper": study.paper, "claim": study.claim,
      "size": size, "setup": study.setup if size != "full" else study.full_setup,
      "summary": summary, "criteria": verdicts, "variant_seconds": seconds,
      "wall_seconds": sum(seconds.values()),
      "machine": f"{machine.cpu_model()} ({os.cpu_count()} CPUs; jax {jax.__version__} on "
                 f"{jax.default_backend()})",
      "variants": results,
  }
  # The numbers are on disk before the plots are drawn (a plot that fails loses nothing); then
  # again with the plots' paths.
  harness.write_json(os.path.join(workdir, "results.json"), document)
  document["plots"] = [os.path.relpath(p, workdir) for p in study.plot(summary, results, plot_dir)]
  harness.write_json(os.path.join(workdir, "results.json"), document)
  with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
    f.write(report.markdown(document, study.table(summary)))
  return document
