"""A study's report.md and its terminal summary, both generated from results.json."""

from __future__ import annotations


def _measured(value) -> str:
  if isinstance(value, float):
    return f"{value:.3g}"
  if isinstance(value, dict):
    return ", ".join(f"{k} {_measured(v)}" for k, v in value.items())
  return str(value)


def verdict_lines(document: dict) -> list[str]:
  """One 'PASS|FAIL  claim — measured' line per criterion."""
  lines = []
  for c in document["criteria"]:
    lines.append(f"{'PASS' if c['passed'] else 'FAIL'}  {c['test']}: {_measured(c['measured'])}")
  return lines


def markdown(document: dict, table: str, level: int = 1) -> str:
  """report.md: claim, setup, the results table, PASS/FAIL per claim, plots, wall time; the
  title a heading of `level` (2 inside docs/studies.md), its parts one level below."""
  passed = sum(c["passed"] for c in document["criteria"])
  h1, h2 = "#" * level, "#" * (level + 1)
  out = [f"{h1} {document['title']} ({document['size']})", "",
         f"**Paper:** {document['paper']}", "",
         f"**Claim:** {document['claim']}", "",
         f"**Setup:** {document['setup']}", "",
         f"{h2} Results", "", table, "",
         f"{h2} Claims: {passed} of {len(document['criteria'])} reproduced", "",
         "| verdict | the paper says | our test | measured |", "|---|---|---|---|"]
  for c in document["criteria"]:
    out.append(f"| {'PASS' if c['passed'] else 'FAIL'} | {c['quote']} | {c['test']} | "
               f"{_measured(c['measured'])} |")
  fails = [c for c in document["criteria"] if not c["passed"] and c["if_fail"]]
  if fails:
    out += ["", "Why these fail at this scale:", ""]
    out += [f"- *{c['test']}*: {c['if_fail']}" for c in fails]
  if document.get("plots"):
    out += ["", f"{h2} Plots", ""] + [f"![{p}]({p})" for p in document["plots"]]
  seconds = document["wall_seconds"]
  out += ["", f"Wall time: {seconds / 60:.1f} min (training and evaluation of "
          f"{len(document['variant_seconds'])} variants) on {document['machine']}.", ""]
  return "\n".join(out)
