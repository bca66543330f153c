"""What a study is: variants to train, a summary of their results, and the paper's claims.

A study is sized by `size`: `smoke` (a few steps at tiny lengths, run by the test suite),
`cpu` (the scaled-down reproduction, <= ~20 minutes on 2 CPU cores) and `full` (the paper's
model size, data and steps, for accelerators).

Each claim is a `Criterion`: the paper's words, the numeric test in words, and a function of
the study's summary that returns (passed, measured value). Criteria are chosen from the paper's
text before any result is seen and never loosened afterwards; when one fails at this scale the
study says why in `if_fail`, next to the FAIL.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import ml_collections

SIZES = ("smoke", "cpu", "full")


@dataclasses.dataclass(frozen=True)
class Criterion:
  quote: str      # the paper's claim, in its words
  test: str       # what we check, numerically, in words
  check: Callable[[dict], tuple[bool, Any]]  # summary -> (passed, measured value)
  if_fail: str = ""  # why it fails at this scale (shown only when it does)


@dataclasses.dataclass(frozen=True)
class Study:
  """A reproduction: see the module docstring.

  `config(size)` is the base run config; `variants(size)` maps each variant's name to the
  dotted config fields that make it (`--config.a.b=v` style); `summarize({variant: {eval
  task: result}})` returns the study's summary (JSON-able: what the criteria, the table and the
  plots read); `table(summary)` renders it as a markdown table; `plot(summary, variant results,
  plot_dir)` writes the study's figures and returns their paths.
  """

  name: str
  title: str
  paper: str       # the citation
  claim: str       # one line, for --list
  setup: str       # the scaled-down setup (cpu), in words
  full_setup: str  # what `full` runs and how it compares with the paper
  config: Callable[[str], ml_collections.ConfigDict]
  variants: Callable[[str], dict[str, dict]]
  summarize: Callable[[dict[str, dict]], dict]
  criteria: tuple[Criterion, ...]
  table: Callable[[dict], str]
  plot: Callable[[dict, dict, str], list[str]] = lambda summary, results, plot_dir: []


def check_criteria(criteria: tuple[Criterion, ...], summary: dict) -> list[dict]:
  """Evaluates every criterion on `summary`: [{quote, test, passed, measured, if_fail}].

  A criterion whose check raises (a summary without the numbers it reads) is a FAIL whose
  measured value names the error, so that a broken study never reads as a pass.
  """
  out = []
  for c in criteria:
    try:
      passed, measured = c.check(summary)
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:
      passed, measured = False, f"cannot be computed: {type(e).__name__}: {e}"
    out.append({"quote": c.quote, "test": c.test, "passed": bool(passed),
                "measured": measured, "if_fail": c.if_fail})
  return out


def mean_reciprocal_rank(scores: dict[str, dict[str, float]]) -> dict[str, float]:
  """{method: {task: score}} -> {method: mean over tasks of 1 / rank}, higher score ranks first.

  Ties share the best rank of the tied group (two methods tied for first both get 1).
  """
  methods = list(scores)
  tasks = sorted({t for per_task in scores.values() for t in per_task})
  mrr = {m: 0.0 for m in methods}
  for task in tasks:
    values = {m: scores[m][task] for m in methods}
    for m in methods:
      rank = 1 + sum(v > values[m] for v in values.values())
      mrr[m] += 1.0 / rank / len(tasks)
  return mrr
