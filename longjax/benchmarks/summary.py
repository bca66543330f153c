"""The README's benchmark table, generated from checked-in benchmark JSON (never typed by hand).

  python -m experiments.report --benchmarks=docs/benchmarks/train_small.json,...

One row per headline measurement: what was measured, longjax's number, the peer's, and the ratio
(> 1: longjax better), followed by the machine and the command of each report.
"""

import json

from longjax.benchmarks import lm
from longjax.benchmarks import reports


def _ok(r: dict) -> bool:
  return r.get("status") == "ok"


def _train_rows(report: dict) -> list[list]:
  rows = []
  for r in report["cases"]:
    if r["impl"] != "longjax":
      continue
    peer = next((p for p in report["cases"] if p["impl"] == "hf_llama"
                 and all(p[k] == r[k] for k in ("width", "layers", "t", "batch"))), None)
    shape = lm.LMShape(r["width"], r["layers"], r["t"], r["batch"]).name()
    mfu = f" (MFU {100 * r['mfu']:.0f}%)" if r.get("mfu") else ""
    rows.append([f"train step tokens/s, {shape}",
                 f"{reports.fmt(r.get('tokens_per_s'))}{mfu}" if _ok(r) else r["status"],
                 "HF Llama " + (reports.fmt(peer.get("tokens_per_s")) if peer and _ok(peer)
                                 else "not run"),
                 r.get("speedup_vs_hf")])
  return rows


def _decode_rows(report: dict) -> list[list]:
  rows = []
  for r in report["cases"]:
    if r["impl"] != "longjax":
      continue
    peer = next((p for p in report["cases"] if p["impl"] == "hf_llama" and p["t"] == r["t"]
                 and p["width"] == r["width"] and p["layers"] == r["layers"]), None)
    peer_ok = peer is not None and _ok(peer)
    model = f"d{r['width']} L{r['layers']}"
    rows.append([f"decode ms/token, {model}, context {r['t']}",
                 reports.fmt(r.get("decode_ms_per_token")) if _ok(r) else r["status"],
                 "HF Llama " + (reports.fmt(peer["decode_ms_per_token"]) if peer_ok
                                 else "not run"),
                 r.get("decode_speedup_vs_hf")])
    rows.append([f"prefill tokens/s, {model}, context {r['t']}",
                 reports.fmt(r.get("prefill_tokens_per_s")) if _ok(r) else r["status"],
                 "HF Llama " + (reports.fmt(peer["prefill_tokens_per_s"]) if peer_ok
                                 else "not run"),
                 r.get("prefill_speedup_vs_hf")])
  return rows


def _memory_rows(report: dict) -> list[list]:
  ours = [r for r in report["cases"] if r["impl"] != "hf_llama" and r.get("longest_t")]
  best = max(ours, key=lambda r: r["longest_t"], default=None)
  peer = next((r for r in report["cases"] if r["impl"] == "hf_llama"), {})
  if best is None:
    return []
  budget = report["memory_budget_bytes"] / 2**30
  peer_t = peer.get("longest_t")
  return [[f"longest train T in {budget:.1f} GiB, d{best['width']} L{best['layers']} B1",
           f"{best['longest_t']} ({best['impl']}, remat {best['remat']})",
           "HF Llama " + (f"{peer_t}{' (extrapolated)' if peer.get('extrapolated') else ''}"
                          if peer_t else "not run"),
           best["longest_t"] / peer_t if peer_t else None]]


def _kernels_rows(report: dict) -> list[list]:
  rows = []
  for r in report["cases"]:
    if r["group"] == "attention" and r["impl"] == "longjax_auto" and _ok(r):
      rows.append([f"causal attention fwd+bwd s, T={r['t']}", reports.fmt(r["time_s"]),
                   "torch SDPA " + reports.fmt(r["time_s"] * (r.get("speedup_vs_torch_sdpa")
                                                              or float("nan"))),
                   r.get("speedup_vs_torch_sdpa")])
  return rows


ROWS = {"train": _train_rows, "decode": _decode_rows, "memory": _memory_rows,
        "kernels": _kernels_rows}


def readme_markdown(paths: list[str]) -> str:
  """The table of every report's headline rows, then where and how each report was made; one
  table per machine (processor) when the reports come from several, headed by its name."""
  machines: dict[str, list[tuple[str, dict]]] = {}
  for path in paths:
    with open(path, encoding="utf-8") as f:
      report = json.load(f)
    machines.setdefault(report["machine"]["processor"], []).append((path, report))
  lines = []
  for processor, in_machine in machines.items():
    if len(machines) > 1:
      lines += [f"**{processor}**", ""]
    rows = [row for _, report in in_machine for row in ROWS[report["suite"]](report)]
    lines += [reports.markdown_table(["measurement", "longjax", "peer", "ratio (> 1: longjax "
                                      "better)"], rows), ""]
    for path, report in in_machine:
      m = report["machine"]
      lines.append(f"- `{path}`: `{m['command']}` on {m['processor']} ({m['cpu_count']} CPUs, "
                   f"jax {m['jax']}, torch {m.get('torch') or '—'}), {m['time']}; f32 matmul "
                   f"peak {reports.fmt(report.get('peak_f32_gflops_per_s'))} GFLOP/s.")
    lines.append("")
  return "\n".join(lines).strip()
