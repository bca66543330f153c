"""`--suite=memory`: the longest sequence one train step fits in a memory budget.

Per attention implementation (dense XLA "reference", "blockwise", "pallas", the fused "cpu"
kernel) and remat policy, the longest T (a multiple of the size set's step) whose train step
fits the budget, found by doubling then bisection; every probe is its own child process, so
nothing a probe does can kill the benchmark. The CPU kernel's own scratch (per-thread block
buffers, ~0.1-0.2 MiB) is outside XLA's buffer assignment; its inputs, outputs and residuals are in.

longjax probes compile the trainer's step (state donated, as `longjax.training.trainer` does)
and read XLA's buffer assignment (`memory_analysis()`: temporaries + arguments + outputs - donated
aliases). On CPU that is what the step allocates; to show it, the first probe of each policy
also runs the step and records its peak resident set size beside the compiled figure. Running
the step at every probe is out of reach on a CPU (one step of the full model at T = 32k is
~10^14 FLOPs, half an hour here).

The HF Llama peer cannot be compiled ahead of time, so it is measured: the peak RSS of one
train step (forward, backward, AdamW) at a few lengths, and its longest T is extrapolated
linearly from the two longest (activation memory is linear in T with SDPA's fused attention,
which keeps no [T, T] matrix); the report marks that value as extrapolated.

Both sides run with glibc's default allocator (`run_case(reuse_freed_memory=False)`): the
entry points' setting keeps freed memory for speed, which raised HF's measured peak at 4k from
4.8 to 5.5 GiB and would have cut its extrapolated ceiling by a third.
"""

from longjax.benchmarks import peers
from longjax.benchmarks import processes
from longjax.benchmarks import progress
from longjax.benchmarks import rss
from longjax.benchmarks import suites
from longjax.benchmarks import lm
from longjax.benchmarks import reports
from longjax.benchmarks import timing
from longjax.benchmarks import train

IMPLS = ("reference", "blockwise", "pallas", "cpu")
REMATS = ("none", "dots_no_batch", "full")
PEER = "hf_llama"

SIZES = {
    "tiny": {"width": 64, "layers": 2, "step": 256, "max_t": 512, "impls": ("blockwise",),
             "remats": ("full",), "budget_gb": 0.05, "hf_ts": (256, 512), "timeout_s": 300},
    "small": {"width": 512, "layers": 4, "step": 1024, "max_t": 131072,
              "impls": ("reference", "blockwise"), "remats": ("none", "full"), "budget_gb": 2.0,
              "hf_ts": (512, 1024, 2048), "timeout_s": 900},
    "full": {"width": 1024, "layers": 8, "step": 1024, "max_t": 262144, "impls": IMPLS,
             "remats": REMATS, "budget_gb": None, "hf_ts": (1024, 2048, 4096),
             "timeout_s": 900},
}
_JAX_MODULES = ("jax", "flax", "optax", "longjax.models", "longjax.training.step")


def probe_case(impl: str, remat: str, width: int, layers: int, t: int, *,
               run_step: bool) -> dict:
  """Compiles (and with `run_step`, runs once) a longjax train step at batch 1, length t."""
  import functools  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from longjax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from longjax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  shape = lm.LMShape(width, layers, t, 1)
  cfg = lm.longjax_config(shape, remat=remat, impl=impl)
  graphdef, abstract = state_lib.model_graphdef(cfg.model, shape.vocab)
  tx, schedule = state_lib.make_model_optimizer(cfg.model, cfg.train, vocab_size=shape.vocab)
  abstract_params = abstract.to_pure_dict()
  abstract_state = jax.eval_shape(
      lambda p: state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                     opt_state=tx.init(p)), abstract_params)
  tokens = jax.ShapeDtypeStruct((1, t), jnp.int32)
  batch = {"inputs": tokens, "targets": tokens, "positions": tokens, "segment_ids": None,
           "weights": jax.ShapeDtypeStruct((1, t), jnp.float32)}
  step = jax.jit(functools.partial(step_lib.train_step, graphdef, tx, schedule),
                 donate_argnums=0)
  start = time.perf_counter()
  compiled = step.lower(abstract_state, batch).compile()
  memory = timing.compiled_memory(compiled)
  result = {**memory, "footprint_bytes": timing.footprint_bytes(memory),
            "compile_s": time.perf_counter() - start}
  if run_step:
    _, params, _ = lm.build_longjax(shape, remat=remat, impl=impl)
    state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(params))
    data = {"inputs": jnp.zeros((1, t), jnp.int32), "targets": jnp.zeros((1, t), jnp.int32),
            "positions": jnp.arange(t, dtype=jnp.int32)[None], "segment_ids": None,
            "weights": jnp.ones((1, t), jnp.float32)}
    jax.block_until_ready((state, data))
    before = rss.current_rss_mib()
    if rss.reset_peak_rss():  # the peak of the step alone, not of the compilation
      start = time.perf_counter()
      jax.block_until_ready(compiled(state, data))
      result["step_s"] = time.perf_counter() - start
      result["step_rss_growth_mib"] = rss.peak_rss_mib() - before
  return result


def hf_case(width: int, layers: int, t: int) -> dict:
  """One HF Llama train step at batch 1, length t; the parent reads the child's peak RSS."""
  result = train.train_case(PEER, width, layers, t, 1, repeats=0, budget_s=0.0,
                            memory_budget=None)
  return {"step_s": result["time_s"]}


# ---------------------------------------------------------------------------------------------
# The suite (parent side).


def _probe(impl, remat, cfg, t, budget, run_step=False) -> dict:
  kwargs = {"impl": impl, "remat": remat, "width": cfg["width"], "layers": cfg["layers"], "t": t,
            "run_step": run_step}
  r = processes.run_case(__name__, "probe_case", kwargs, timeout_s=cfg["timeout_s"],
                      preload=_JAX_MODULES, reuse_freed_memory=False)
  r.update(t=t, fits=r.get("status") == "ok" and r["footprint_bytes"] <= budget)
  return r


def longest_fitting(fits, step: int, max_t: int) -> tuple[int | None, int | None]:
  """(longest multiple of `step` in [step, max_t] with fits(T), shortest one without).

  Doubles from `step` until a length does not fit, then bisects between the last fit and the
  first failure. Assumes fitting is monotone in T. (None, step) when even `step` does not fit;
  (longest, None) when `max_t` fits.
  """
  if not fits(step):
    return None, step
  good, bad = step, None
  while bad is None:
    nxt = min(2 * good, max_t)
    if nxt == good:
      return good, None
    if fits(nxt):
      good = nxt
    else:
      bad = nxt
  while bad - good > step:
    mid = (good + bad) // 2 // step * step
    if fits(mid):
      good = mid
    else:
      bad = mid
  return good, bad


def _allocated_by_step(probe: dict) -> int | None:
  """What the compiled step allocates beyond its (donated) inputs: temporaries and the outputs
  that do not reuse an input buffer."""
  if probe.get("status") != "ok":
    return None
  return (probe.get("temp_bytes") or 0) + (probe.get("output_bytes") or 0) - (
      probe.get("alias_bytes") or 0)


def search(impl: str, remat: str, cfg: dict, budget: int, bar=None) -> dict:
  """The longest T for one (impl, remat), with every probe's result."""
  probes = {}

  def fits(t):
    probes[t] = _probe(impl, remat, cfg, t, budget, run_step=not probes)
    if bar is not None:
      bar.set_postfix_str(f"{impl} remat={remat} T={t}")
    return probes[t]["fits"]

  longest, first_fail = longest_fitting(fits, cfg["step"], cfg["max_t"])
  errors = [p for p in probes.values() if p.get("status") not in ("ok", "oom")]
  first = probes[min(probes)]
  return {"impl": impl, "remat": remat, "width": cfg["width"], "layers": cfg["layers"],
          "longest_t": longest, "first_failing_t": first_fail,
          "footprint_at_longest": probes[longest]["footprint_bytes"] if longest else None,
          "footprint_at_failing": (probes[first_fail].get("footprint_bytes")
                                   if first_fail else None),
          "verified_t": first["t"], "verified_growth_mib": first.get("step_rss_growth_mib"),
          "verified_new_bytes": _allocated_by_step(first),
          "errors": [f"T={p['t']}: {p.get('status')}: {p.get('reason')}" for p in errors],
          "probes": sorted(probes.values(), key=lambda p: p["t"])}


def hf_search(cfg: dict, budget: int) -> dict:
  """HF's peak RSS at cfg["hf_ts"] and its longest T, extrapolated linearly where needed."""
  no_torch = peers.torch_missing(("torch", "transformers"))
  if no_torch:
    return {"impl": PEER, "status": "skipped", "reason": no_torch}
  runs = []
  for t in cfg["hf_ts"]:
    r = processes.run_case(__name__, "hf_case", {"width": cfg["width"], "layers": cfg["layers"],
                                              "t": t}, timeout_s=cfg["timeout_s"],
                        preload=("torch", "transformers"), env=peers.torch_env(),
                        reuse_freed_memory=False)
    runs.append({"t": t, **r})
  ok = [r for r in runs if r.get("status") == "ok" and r.get("rss_peak_mib")]
  out = {"impl": PEER, "remat": "none", "width": cfg["width"], "layers": cfg["layers"],
         "runs": runs, "status": "ok" if ok else "error"}
  over = [r for r in ok if r["rss_peak_mib"] * 2**20 > budget]
  if over:
    out.update(longest_t=max((r["t"] for r in ok if r not in over), default=None),
               extrapolated=False)
  elif len(ok) >= 2:
    (t0, m0), (t1, m1) = [(r["t"], r["rss_peak_mib"] * 2**20) for r in ok[-2:]]
    slope = (m1 - m0) / (t1 - t0)
    longest = int(t1 + (budget - m1) / slope) if slope > 0 else None
    out.update(longest_t=None if longest is None else longest // cfg["step"] * cfg["step"],
               extrapolated=True, bytes_per_token=slope)
  return out


def run(sizes: str, budget: int) -> list[dict]:
  cfg = SIZES[sizes]
  combos = [(i, r) for i in cfg["impls"] for r in cfg["remats"]]
  bar = progress.progress(combos + [(PEER, "none")], desc="memory")
  results = []
  for impl, remat in bar:
    results.append(hf_search(cfg, budget) if impl == PEER else
                   search(impl, remat, cfg, budget, bar if hasattr(bar, "set_postfix_str")
                          else None))
  return results


def derive(results: list[dict], shape: lm.LMShape) -> dict:
  ours = [r for r in results if r["impl"] != PEER and r.get("longest_t")]
  best = max(ours, key=lambda r: r["longest_t"], default=None)
  target = {"target": "a 1024-wide, 8-layer model trains at T = 32k (longest T reported)",
            "measured": ("not measured at these sizes" if shape.width != 1024 or
                         shape.layers != 8 or best is None else
                         f"longest T = {best['longest_t']} ({best['impl']}, remat="
                         f"{best['remat']})"),
            "met": (None if shape.width != 1024 or shape.layers != 8 or best is None else
                    best["longest_t"] >= 32768)}
  return {"targets": [target]}


def markdown(results: list[dict], summary: dict, cfg: dict, budget: int) -> str:
  g = lambda x: None if x is None else x / 2**30  # noqa: E731
  rows = []
  for r in results:
    if r["impl"] == PEER:
      measured = ", ".join(f"T={x['t']}: {x['rss_peak_mib'] / 1024:.2f} GiB"
                           for x in r.get("runs", []) if x.get("rss_peak_mib"))
      rows.append(["HF Llama (torch)", "none (eager)", r.get("longest_t"),
                   "extrapolated" if r.get("extrapolated") else "measured", None, None,
                   f"peak RSS {measured}" if measured else r.get("reason", "")])
      continue
    note = "—"
    if r["verified_growth_mib"] is not None and r["verified_new_bytes"] is not None:
      note = (f"ran at T={r['verified_t']}: allocates {r['verified_new_bytes'] / 2**20:.0f} MiB "
              f"by XLA's assignment, process grew {r['verified_growth_mib']:.0f} MiB")
    if r["errors"]:
      note += "; " + "; ".join(r["errors"])
    rows.append([r["impl"], r["remat"], r["longest_t"], "compiled",
                 g(r["footprint_at_longest"]), r["first_failing_t"], note])
  return "\n".join([
      f"### Longest trainable T (batch 1, width {cfg['width']}, {cfg['layers']} layers, budget "
      f"{budget / 2**30:.2f} GiB)\n",
      "T in multiples of " f"{cfg['step']} up to {cfg['max_t']}; footprint = XLA's buffer "
      "assignment of the donated train step.\n",
      reports.markdown_table(["attention", "remat", "longest T", "how", "footprint (GiB)",
                              "first T that does not fit", "check"], rows),
      "\n### Targets\n", reports.targets_table(summary["targets"])])


def plot(results: list[dict], stem: str) -> list[str]:
  """Longest trainable T per attention implementation and remat policy (HF beside them)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [r for r in results if r.get("longest_t")]
  labels = [("HF Llama" + (" (extrapolated)" if r.get("extrapolated") else "")
             if r["impl"] == PEER else f"{r['impl']}, remat {r['remat']}") for r in rows]
  fig, ax = plt.subplots(figsize=(7, 0.6 + 0.45 * max(1, len(rows))))
  ax.barh(range(len(rows)), [r["longest_t"] for r in rows],
          color=["tab:gray" if r["impl"] == PEER else "tab:blue" for r in rows])
  ax.set_yticks(range(len(rows)), labels)
  ax.invert_yaxis()
  ax.set_xscale("log", base=2)
  ax.set_xlabel("longest sequence length of one train step (batch 1)")
  ax.set_title("Memory ceiling (same budget, same machine)")
  fig.tight_layout()
  path = f"{stem}_memory.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return [path]


def run_suite(sizes: str, out: str, *, argv: list[str], memory_budget_gb: float | None = None,
              make_plots: bool = False, **unused) -> str:
  """Runs the memory suite (budget: the flag, else the size set's, else 75% of free memory)."""
  del unused
  cfg = SIZES[sizes]
  shape = lm.LMShape(cfg["width"], cfg["layers"], cfg["step"], 1)
  budget_gb = memory_budget_gb or cfg["budget_gb"]
  budget = rss.memory_budget_bytes(budget_gb)
  return suites.run_suite_with(
      "memory", sizes, out, argv=argv, memory_budget_gb=budget_gb,
      run=lambda _: run(sizes, budget), derive=lambda results, _: derive(results, shape),
      markdown=lambda results, summary: markdown(results, summary, cfg, budget),
      plot=plot if make_plots else None)
