"""A benchmark run's report: markdown tables (numbers to 3 significant digits), the header with
the command, machine and measured matmul peak, the targets table, and the JSON + markdown pair
written side by side.
"""

import json
import math
import os

_MIB = 2**20


def fmt(x, digits: int = 3) -> str:
  """A number for a table: 3 significant digits, '—' for missing values."""
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "—"
  if isinstance(x, int):
    return str(x)
  return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
  """A GitHub markdown table; numbers right-aligned."""
  def cell(x):
    return fmt(x) if isinstance(x, (int, float)) or x is None else str(x)
  align = ["---:" if rows and isinstance(rows[0][i], (int, float)) else "---"
           for i in range(len(headers))]
  lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
  lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
  return "\n".join(lines)


def write_report(path: str, report: dict, markdown: str) -> str:
  """Writes the JSON to `path` and the markdown beside it (same name, .md); returns that path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1, default=_json_default)
    f.write("\n")
  md_path = os.path.splitext(path)[0] + ".md"
  with open(md_path, "w") as f:
    f.write(markdown + "\n")
  return md_path


def _json_default(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  return str(x)


def mib(x) -> float | None:
  return None if x is None else x / _MIB


def header_markdown(suite: str, sizes: str, machine: dict, peak: dict,
                    memory_budget: int | None = None) -> str:
  """The report's opening: command, machine, versions and the measured matmul peak."""
  lines = [f"## Benchmark `{suite}` ({sizes} sizes)\n",
           f"Command: `{machine['command']}`  ",
           f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs, "
           f"{machine.get('mem_total_gib', 0):.0f} GiB, jax {machine['jax']} "
           f"({machine['jax_backend']}), torch {machine.get('torch') or 'not installed'}, "
           f"load average at start {machine['load_average_at_start'][0]:.1f}, "
           f"{machine['time']}  "]
  if memory_budget:
    lines.append(f"Memory budget per case (compiled footprint): {memory_budget / 2**30:.1f} GiB")
  lines.append("\n### Matmul peak (jitted, median)\n")
  rows = [[name, r.get("n"), r.get("gflops_per_s"), r.get("time_s"),
           "ok" if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason', '')}"]
          for name, r in peak.items()]
  lines.append(markdown_table(["matmul", "n", "GFLOP/s", "time (s)", "status"], rows))
  lines.append("\nUtilisation columns are against the jitted JAX f32 matmul's GFLOP/s.\n")
  return "\n".join(lines)


def targets_table(targets: list[dict]) -> str:
  """The issue's targets as a table: target, what this run measured, met (yes / **no** / —)."""
  return markdown_table(["target", "measured", "met"],
                        [[t["target"], t["measured"], {True: "yes", False: "**no**", None: "—"}
                          [t["met"]]] for t in targets])


def plot_decode_vs_context(results: list[dict], impls, labels: dict, path: str, *, title: str,
                           log_y: bool = False) -> str:
  """Decode ms/token against the context length, one line per implementation; writes `path`."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for impl in impls:
    rows = sorted((r for r in results if r["impl"] == impl and r.get("status") == "ok"),
                  key=lambda r: r["t"])
    if rows:
      ax.plot([r["t"] for r in rows], [r["decode_ms_per_token"] for r in rows], "o-",
              label=labels[impl])
  ax.set_xscale("log", base=2)
  if log_y:
    ax.set_yscale("log")
  ax.set_xlabel("context length (tokens in the cache)")
  ax.set_ylabel("decode ms / token")
  ax.set_title(title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
