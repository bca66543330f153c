"""The kernels suite: longjax's attention, decode, linear attention and scan against their peers.

Four groups of cases, each case one child process running a function of
`longjax.benchmarks.kernel_cases`:
  attention  causal softmax attention fwd+bwd, B=1, N=8, H=64, f32: longjax
             `dot_product_attention` (impl "auto" and "pallas"), `jax.nn.dot_product_attention`
             and PyTorch `scaled_dot_product_attention`, with backward.
  decode     one query token against a full KV cache (B=1, N=K=8, H=64): the Pallas decode
             kernel, longjax `dot_product_attention` with a traced q_offset, a plain jnp
             softmax, PyTorch SDPA.
  linear     causal linear attention fwd+bwd (B=1, N=8, Dk=Dv=64): the Pallas chunked kernel,
             longjax's chunked XLA form (`longjax.ops.linear_attention`, what the mixers run
             on CPU) and the `lax.scan` recurrence.
  scan       Mamba-1 selective scan fwd+bwd (B=1, P=16): the Pallas kernel, the `lax.scan`
             reference, and the per-step PyTorch loop of HF transformers'
             `MambaMixer.slow_forward` (what `transformers` runs for Mamba without CUDA).

On CPU the Pallas kernels run in the interpreter and are labelled so: their times say what the
interpreter costs on this machine, not what the kernels do on a TPU or GPU.
"""

import math
import os

from longjax.benchmarks import suites
from longjax.benchmarks import kernel_cases
from longjax.benchmarks import reports
from longjax.benchmarks.kernel_cases import HEAD_DIM, HEADS, STATE

GROUPS = ("attention", "decode", "linear", "scan")
IMPLS = {
    "attention": ("longjax_auto", "longjax_blockwise", "longjax_pallas", "jax_nn",
                  "torch_sdpa"),
    "decode": ("pallas_decode", "longjax_auto", "jnp_dense", "torch_sdpa"),
    "linear": ("pallas", "recurrent_scan", "chunked_jnp"),
    "scan": ("pallas", "lax_scan", "torch_loop"),
}
LABELS = {
    "longjax_auto": "longjax auto", "longjax_blockwise": "longjax XLA blockwise",
    "longjax_pallas": "longjax pallas",
    "jax_nn": "jax.nn.dot_product_attention", "torch_sdpa": "torch SDPA",
    "pallas_decode": "pallas decode", "jnp_dense": "plain jnp", "pallas": "pallas",
    "recurrent_scan": "lax.scan recurrence", "chunked_jnp": "longjax chunked XLA (CPU default)",
    "lax_scan": "lax.scan reference", "torch_loop": "torch loop (HF slow_forward)",
}
# The peers each group's ratios are taken against (time of peer / time of the row: > 1 means
# the row is faster).
PEERS = {"attention": ("jax_nn", "torch_sdpa"), "decode": ("jnp_dense", "torch_sdpa"),
         "linear": ("recurrent_scan",), "scan": ("lax_scan", "torch_loop")}

# Sizes. `pallas_max_t`: the longest T at which the interpreted flash attention kernel runs
# (above it a call takes well over a minute on a 2-core CPU: 2.5 s at T=2k, growing ~T^2).
SIZES = {
    "tiny": {"attention": [128], "pallas_max_t": 128, "decode": [256], "linear": [128],
             "scan": [(64, 64)], "repeats": 3, "budget_s": 5, "timeout_s": 120},
    # `small` adds T=1024 and 2048 to attention (and 2048 to linear attention): the issue's
    # targets start at T=2k, and linear attention then meets softmax attention at three
    # lengths. The whole set takes a few minutes on 2 cores (the interpreter ~3 s a call at 2k).
    "small": {"attention": [256, 512, 1024, 2048], "pallas_max_t": 2048, "decode": [1024],
              "linear": [256, 1024, 2048], "scan": [(512, 128)], "repeats": 5, "budget_s": 20,
              "timeout_s": 300},
    "full": {"attention": [1024, 2048, 4096, 8192, 16384, 32768, 65536], "pallas_max_t": 8192,
             "decode": [4096, 16384, 65536, 262144], "linear": [1024, 4096, 16384, 65536],
             # Single calls of the 64k cases take minutes on 2 cores (blockwise ~T^2).
             "scan": [(8192, 1024)], "repeats": 3, "budget_s": 60, "timeout_s": 2400},
}
_JAX_MODULES = ("jax", "kernels_pallas", "longjax.ops")  # imported before a case's base RSS


def plan(sizes: str, groups=GROUPS) -> list[dict]:
  """Every case of the suite at `sizes`: dicts with group, impl, the size and its function."""
  cfg = SIZES[sizes]
  cases = []
  for group in groups:
    for size in cfg[group]:
      for impl in IMPLS[group]:
        case = {"group": group, "impl": impl, "function": f"{group}_case"}
        if group == "scan":
          case.update(length=size[0], d_model=size[1])
        elif group == "decode":
          case["cache"] = size
        else:
          case["t"] = size
        if group == "attention" and impl == "longjax_pallas" and size > cfg["pallas_max_t"]:
          case["skip"] = (f"the Pallas interpreter is not run above T={cfg['pallas_max_t']} "
                          "at these sizes (a call would take well over a minute)")
        cases.append(case)
  # Linear attention is compared with causal softmax attention (longjax auto) at the same T:
  # where the attention group does not run that case (e.g. `--groups=linear`), add it.
  have = {c["t"] for c in cases if c["group"] == "attention" and c["impl"] == "longjax_auto"}
  for t in cfg["linear"] if "linear" in groups else ():
    if t not in have:
      cases.append({"group": "attention", "impl": "longjax_auto", "function": "attention_case",
                    "t": t})
  return cases


def run(sizes: str, *, groups=GROUPS, memory_budget: int | None,
        timeout_s: float | None = None) -> list[dict]:
  """Runs every case in its own child process; returns the result dicts in plan order."""
  cfg = SIZES[sizes]
  cases = []
  for case in plan(sizes, groups):
    size = {k: case[k] for k in ("t", "cache", "length", "d_model") if k in case}
    cases.append({"function": case["function"], "torch": case["impl"].startswith("torch"),
                  "labels": {"group": case["group"], "impl": case["impl"], **size},
                  "kwargs": {"impl": case["impl"], **size, "repeats": cfg["repeats"],
                             "budget_s": cfg["budget_s"], "memory_budget": memory_budget},
                  **({"skip": case["skip"]} if "skip" in case else {})})
  return suites.run_cases(kernel_cases.__name__, cases, desc="kernels",
                          jax_modules=_JAX_MODULES,
                          timeout_s=cfg["timeout_s"] if timeout_s is None else timeout_s)


def size_of(case: dict) -> int:
  """The length a case is measured at: T, the cache length, or the scan length L."""
  return case.get("t", case.get("cache", case.get("length")))


def find(results: list[dict], group: str, impl: str, size: int) -> dict | None:
  """The result of `impl` in `group` at length `size`, or None."""
  for r in results:
    if r["group"] == group and r["impl"] == impl and size_of(r) == size:
      return r
  return None


def _ok_time(r):
  return r["time_s"] if r is not None and r.get("status") == "ok" else None


def derive(results: list[dict], peak_gflops: float | None) -> dict:
  """Adds ratios and utilisation to each result in place; returns suite-level figures."""
  for r in results:
    own = _ok_time(r)
    for peer in PEERS[r["group"]]:
      other = _ok_time(find(results, r["group"], peer, size_of(r)))
      r[f"speedup_vs_{peer}"] = other / own if own and other else None
    if peak_gflops and r.get("gflops_per_s") is not None and r["group"] == "attention":
      r["fraction_of_peak"] = r["gflops_per_s"] / peak_gflops
    if r["group"] == "linear":
      softmax = _ok_time(find(results, "attention", "longjax_auto", r["t"]))
      r["speedup_vs_softmax_auto"] = softmax / own if own and softmax else None
    if r["group"] == "attention":
      # Compiled temp memory is known even for a case refused as too big (it is compiled first).
      other = (find(results, "attention", "jax_nn", r["t"]) or {}).get("temp_bytes")
      r["temp_vs_jax_nn"] = r["temp_bytes"] / other if r.get("temp_bytes") and other else None
  flatness = {}
  for impl in IMPLS["linear"]:
    rows = sorted((r for r in results if r["group"] == "linear" and r["impl"] == impl
                   and r.get("status") == "ok"), key=lambda r: r["t"])
    if len(rows) >= 2:
      flatness[impl] = {"t_short": rows[0]["t"], "t_long": rows[-1]["t"],
                        "ratio": rows[-1]["tokens_per_s"] / rows[0]["tokens_per_s"]}
  summary = {"linear_flatness": flatness}
  summary["targets"] = targets(results, summary)
  return summary


def _rows(results, group, impl, at_least=0):
  return [r for r in results if r["group"] == group and r["impl"] == impl
          and size_of(r) >= at_least]


def _extreme(rows, field, pick=min):
  """(value, size) of the smallest (or largest) `field` over rows that have it, else None."""
  values = [(r[field], size_of(r)) for r in rows if r.get(field) is not None]
  return pick(values) if values else None


def targets(results: list[dict], summary: dict) -> list[dict]:
  """The issue's targets, each with what this run measured and whether it is met.

  "met" is None where these sizes do not reach the target's lengths (or a side did not run).
  On CPU the Pallas rows are the interpreter, so their targets say little about the kernels.
  """
  out = []

  def add(target, found, ok, fmt_value):
    if found is None:
      out.append({"target": target, "measured": "not measured at these sizes", "met": None})
    else:
      out.append({"target": target, "measured": fmt_value(found), "met": ok(found[0])})

  def ratio(found):
    return f"{found[0]:.2f}x (worst at T={found[1]})"

  add("attention fwd+bwd, longjax auto >= 1.0x torch SDPA at every T >= 2k",
      _extreme(_rows(results, "attention", "longjax_auto", 2048), "speedup_vs_torch_sdpa"),
      lambda v: v >= 1.0, ratio)
  at16k = find(results, "attention", "longjax_auto", 16384)
  add("attention fwd+bwd at T=16k, longjax auto >= 3x faster than jax.nn",
      None if at16k is None or at16k.get("speedup_vs_jax_nn") is None else
      (at16k["speedup_vs_jax_nn"], 16384), lambda v: v >= 3, ratio)
  add("attention fwd+bwd at T=16k, longjax auto compiled temp <= 1/8 of jax.nn's",
      None if at16k is None or at16k.get("temp_vs_jax_nn") is None else
      (at16k["temp_vs_jax_nn"], 16384), lambda v: v <= 1 / 8, lambda f: f"{f[0]:.3f} of it")
  add("attention fwd+bwd, longjax auto >= 50% of the f32 matmul peak at T >= 8k",
      _extreme(_rows(results, "attention", "longjax_auto", 8192), "fraction_of_peak"),
      lambda v: v >= 0.5, lambda f: f"{100 * f[0]:.0f}% (worst at T={f[1]})")
  flat = summary["linear_flatness"].get("pallas")
  add("linear attention (pallas) flat: tokens/s at the longest T >= 0.9x at the shortest",
      None if flat is None else (flat["ratio"], flat["t_long"]), lambda v: v >= 0.9,
      lambda f: f"{f[0]:.2f} (T={flat['t_short']}..{flat['t_long']})")
  longest = _extreme(_rows(results, "linear", "pallas"), "speedup_vs_softmax_auto",
                     pick=lambda v: max(v, key=lambda x: x[1]))
  add("linear attention (pallas) >= 10x faster than softmax attention at T=64k",
      longest if longest and longest[1] >= 65536 else None, lambda v: v >= 10,
      lambda f: f"{f[0]:.1f}x at T={f[1]}")
  for peer in PEERS["scan"]:
    add(f"selective scan (pallas) fwd+bwd at L=8k faster than the {LABELS[peer]}",
        _extreme(_rows(results, "scan", "pallas", 8192), f"speedup_vs_{peer}"),
        lambda v: v > 1, lambda f: f"{f[0]:.2f}x")
  return out


def _label(r):
  label = LABELS[r["impl"]]
  resolved = r.get("resolved")
  if r["impl"] == "longjax_auto" and resolved:
    return f"{label} (→ {resolved})"
  if resolved and "interpret" in resolved:
    return f"{label} (interpret)"
  return label


def _shown(r, field):
  """A result's field for a table; nothing for cases that did not run (skipped, killed)."""
  return r.get(field) if r.get("status") in ("ok", "oom") else None


def _status(r):
  return "ok" if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason', '')}"


def markdown(results: list[dict], summary: dict) -> str:
  """The suite's tables, one per group; ratios are peer time / row time (> 1: row faster)."""
  m = reports.mib
  out = []
  groups = [g for g in GROUPS if any(r["group"] == g for r in results)]
  for group in groups:
    rows = [r for r in results if r["group"] == group]
    peers = PEERS[group]
    ratio_heads = [f"× vs {LABELS[p]}" for p in peers]
    ratio_cells = lambda r: [r.get(f"speedup_vs_{p}") for p in peers]  # noqa: E731
    if group == "attention":
      out.append(f"### Causal attention fwd+bwd (B=1, N={HEADS}, H={HEAD_DIM}, f32)\n")
      heads = ["T", "implementation", "time (s)", "GFLOP/s", "% of f32 peak",
               "compiled temp (MiB)", "peak RSS (MiB)", *ratio_heads, "status"]
      body = [[r["t"], _label(r), r.get("time_s"), r.get("gflops_per_s"),
               None if r.get("fraction_of_peak") is None else 100 * r["fraction_of_peak"],
               m(_shown(r, "temp_bytes")), _shown(r, "rss_peak_mib"), *ratio_cells(r), _status(r)]
              for r in rows]
    elif group == "decode":
      out.append(f"### Decode attention, one token vs a full cache (B=1, N=K={HEADS}, "
                 f"H={HEAD_DIM}, f32)\n")
      heads = ["cache", "implementation", "ms/token", "cache GB/s", "compiled temp (MiB)",
               "peak RSS (MiB)", *ratio_heads, "status"]
      body = [[r["cache"], _label(r), r.get("ms_per_token"), r.get("cache_gb_per_s"),
               m(_shown(r, "temp_bytes")), _shown(r, "rss_peak_mib"), *ratio_cells(r), _status(r)]
              for r in rows]
    elif group == "linear":
      out.append(f"### Causal linear attention fwd+bwd (B=1, N={HEADS}, Dk=Dv={HEAD_DIM}, "
                 "f32)\n")
      heads = ["T", "implementation", "tokens/s", "time (s)", "compiled temp (MiB)",
               "peak RSS (MiB)", *ratio_heads, "× vs softmax (longjax auto)", "status"]
      body = [[r["t"], _label(r), r.get("tokens_per_s"), r.get("time_s"),
               m(_shown(r, "temp_bytes")), _shown(r, "rss_peak_mib"), *ratio_cells(r),
               r.get("speedup_vs_softmax_auto"), _status(r)] for r in rows]
    else:
      out.append(f"### Selective scan fwd+bwd (B=1, P={STATE}, f32)\n")
      heads = ["L", "D", "implementation", "time (s)", "tokens/s", "compiled temp (MiB)",
               "peak RSS (MiB)", *ratio_heads, "status"]
      body = [[r["length"], r["d_model"], _label(r), r.get("time_s"), r.get("tokens_per_s"),
               m(_shown(r, "temp_bytes")), _shown(r, "rss_peak_mib"), *ratio_cells(r), _status(r)]
              for r in rows]
    out.append(reports.markdown_table(heads, body) + "\n")
    if group == "linear":
      for impl, f in summary["linear_flatness"].items():
        out.append(f"Flatness, {LABELS[impl]}: tokens/s at T={f['t_long']} / at "
                   f"T={f['t_short']} = {f['ratio']:.2f}\n")
  out.append("### Targets (issue 6)\n")
  out.append(reports.targets_table(summary["targets"]) + "\n")
  out.append("Ratios (× vs X) are X's time / the row's time: above 1 the row is faster. "
             "Peak RSS is the case's whole child process (interpreter, jax or torch, inputs).")
  out.append(_conditions(results))
  return "\n".join(out)


def _conditions(results: list[dict]) -> str:
  """A line on what the cases ran beside: imports' RSS and the machine's load."""
  base = {}
  for r in results:
    if r.get("rss_base_mib"):
      kind = "torch" if r["impl"].startswith("torch") else "jax"
      base[kind] = min(base.get(kind, math.inf), r["rss_base_mib"])
  loads = [x for r in results for x in (r.get("load_average_start"), r.get("load_average_end"))
           if x is not None]
  parts = ["RSS after imports alone: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in base.items())]
  if loads:
    cpus = os.cpu_count() or 1
    parts.append(f"1-minute load average during the cases {min(loads):.1f}-{max(loads):.1f} on "
                 f"{cpus} CPUs" + (" (other jobs shared the cores: absolute times are inflated; "
                                   "compare ratios)" if max(loads) > cpus else ""))
  return ". ".join(parts) + "."


def plot(results: list[dict], stem: str) -> list[str]:
  """Time vs size per implementation, log-log, one PNG per group; returns the paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  xlabels = {"attention": "T", "decode": "cache length", "linear": "T", "scan": "L"}
  for group in GROUPS:
    rows = [r for r in results if r["group"] == group and r.get("status") == "ok"]
    if not rows:
      continue
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl in IMPLS[group]:
      pts = sorted((size_of(r), r["time_s"]) for r in rows if r["impl"] == impl)
      if pts:
        first = next(r for r in rows if r["impl"] == impl)
        # "auto" may resolve differently per size; the tables say to what.
        label = LABELS[impl] if impl == "longjax_auto" else _label(first)
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabels[group])
    ax.set_ylabel("ms per token" if group == "decode" else "seconds")
    if group == "decode":  # time_s in ms for readability
      for line in ax.get_lines():
        line.set_ydata([y * 1e3 for y in line.get_ydata()])
      ax.relim()
      ax.autoscale_view()
    ax.set_title(f"kernels: {group}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    path = f"{stem}_{group}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


def run_suite(sizes: str, out: str, *, argv: list[str], make_plots: bool = False,
              memory_budget_gb: float | None = None, timeout_s: float | None = None,
              groups=GROUPS) -> str:
  """Measures the peak, runs the kernels suite, writes OUT (JSON), OUT.md and plots.

  Returns:
    The markdown report.
  """
  return suites.run_suite_with(
      "kernels", sizes, out, argv=argv, memory_budget_gb=memory_budget_gb,
      run=lambda budget: run(sizes, groups=groups, memory_budget=budget, timeout_s=timeout_s),
      derive=lambda results, peak: {**derive(results, peak), "impls": IMPLS},
      markdown=markdown, plot=plot if make_plots else None)
