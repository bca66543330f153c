"""docs/studies.md sections generated from a study's results.json (numbers are never typed).

`publish(workdir, docs_path)` copies the study's results.json to `docs/studies/<name>.json`
and its plots to `docs/images/studies/<name>/`, then replaces the study's section of
docs/studies.md (between `<!-- study:NAME -->` and `<!-- /study:NAME -->`, appended if absent)
with `section(results)`. The test suite re-renders every section from the JSON kept in docs/ and
compares, so an edited number fails it.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from longjax.studies import report


def section(document: dict, table: str, image_dir: str) -> str:
  """The markdown of one study, its plots under `image_dir` (relative to docs/)."""
  document = dict(document)
  document["plots"] = [f"{image_dir}/{os.path.basename(p)}" for p in document.get("plots", [])]
  return report.markdown(document, table, level=2).strip("\n")


def _markers(name: str) -> tuple[str, str]:
  return f"<!-- study:{name} -->", f"<!-- /study:{name} -->"


def sections_of(text: str) -> dict[str, str]:
  """{study name: its generated section} of a docs/studies.md text."""
  return {m.group(1): m.group(2).strip("\n") for m in re.finditer(
      r"<!-- study:(\w+) -->\n(.*?)<!-- /study:\1 -->", text, flags=re.S)}


def publish(workdir: str, docs_path: str, table) -> str:
  """Copies the study in `workdir` into docs/ and rewrites its section; returns the section."""
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    document = json.load(f)
  name = document["study"]
  docs_dir = os.path.dirname(os.path.abspath(docs_path))
  os.makedirs(os.path.join(docs_dir, "studies"), exist_ok=True)
  shutil.copy(os.path.join(workdir, "results.json"),
              os.path.join(docs_dir, "studies", f"{name}.json"))
  image_dir = os.path.join("images", "studies", name)
  os.makedirs(os.path.join(docs_dir, image_dir), exist_ok=True)
  for plot in document.get("plots", []):
    shutil.copy(os.path.join(workdir, plot), os.path.join(docs_dir, image_dir,
                                                          os.path.basename(plot)))
  text = section(document, table(document["summary"]), image_dir)
  start, end = _markers(name)
  current = open(docs_path, encoding="utf-8").read() if os.path.exists(docs_path) else ""
  block = f"{start}\n{text}\n{end}"
  if start in current:
    current = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda m: block, current,
                     flags=re.S)
  else:
    current = current.rstrip("\n") + "\n\n" + block + "\n"
  with open(docs_path, "w", encoding="utf-8") as f:
    f.write(current)
  return text
