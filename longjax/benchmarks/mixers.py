"""`--suite=mixers`: each sequence mixer's train step, memory and decode against the length.

One decoder (`longjax.benchmarks.lm`: width, depth, head dim 64, SwiGLU MLP) with every layer's
mixer swapped (`model.mixers`), batch 1. At each length T, in one child process per case:
  * train: one AdamW train step on T tokens (tokens/s) and the step's compiled footprint
    (arguments + outputs + temporaries: the peak memory XLA plans);
  * decode: prefill T tokens, then `decode.NEW_TOKENS` tokens one at a time (ms/token), what
    `longjax.generate` runs.
Rows: softmax attention (`auto`: the fused CPU flash kernel on CPU), and each recurrent mixer
with `auto` (on CPU: the chunked form; S4's and S4D's FFT convolution; Mamba's C++ scan kernel)
and with `impl=recurrent` (a `lax.scan` over time: the naive recurrence a researcher would write
first, the peer of the fast form).
Mamba's own peers: the same models with mixer-only layers (`model.mlp_hidden=0`, as Mamba's
language models are built), rows `mamba_pure` and `mamba2_pure`, beside HF transformers'
`MambaForCausalLM` and `Mamba2ForCausalLM` of the same configuration (torch, f32; on CPU
transformers runs its PyTorch reference path, a Python loop over the steps for Mamba-1), rows
`hf_mamba` and `hf_mamba2`. HF's cases run under the suite's per-case timeout and are recorded
as timed out where they exceed it.
"""

from longjax.benchmarks import decode
from longjax.benchmarks import flops as flops_lib
from longjax.benchmarks import lm
from longjax.benchmarks import reports
from longjax.benchmarks import suites
from longjax.benchmarks import timing
from longjax.benchmarks import train

ATTENTION = "attention"
RECURRENT = ("linear", "retnet", "lightning", "gla", "based", "mamba2", "s4d", "s4", "mamba")
# Implementation name -> `model` overrides. NAME_scan: the mixer's lax.scan recurrence.
# HF peer -> the longjax row of the same model (mixer-only layers).
HF_PEERS = {"hf_mamba": "mamba_pure", "hf_mamba2": "mamba2_pure"}
IMPLS = {ATTENTION: {},
         **{name: {"mixers": name} for name in RECURRENT},
         **{f"{name}_scan": {"mixers": name, f"{name}.impl": "recurrent"} for name in RECURRENT},
         "mamba_pure": {"mixers": "mamba", "mlp_hidden": 0},
         "mamba2_pure": {"mixers": "mamba2", "mlp_hidden": 0}}
ROWS = (*IMPLS, *HF_PEERS)
LABELS = {ATTENTION: "softmax attention (auto)",
          **{name: f"{name} (auto: chunked)" for name in RECURRENT},
          "s4d": "s4d (auto: FFT convolution)", "s4": "s4 (auto: FFT convolution)",
          "mamba": "mamba (auto: C++ scan kernel)",
          **{f"{name}_scan": f"{name} (lax.scan recurrence)" for name in RECURRENT},
          "mamba_pure": "mamba, no MLP (auto)", "mamba2_pure": "mamba2, no MLP (auto)",
          "hf_mamba": "HF MambaForCausalLM (torch, f32)",
          "hf_mamba2": "HF Mamba2ForCausalLM (torch, f32)"}

SIZES = {
    "tiny": {"width": 64, "layers": 2, "ts": [128], "repeats": 2, "budget_s": 5,
             "timeout_s": 300},
    "small": {"width": 256, "layers": 2, "ts": [1024, 4096, 8192], "repeats": 3,
              "budget_s": 30, "timeout_s": 900},
    # The lax.scan peers grow linearly too but cost 10-60x the chunked forms: at full size
    # they run at the first length only (their ratio to the chunked form is flat in T; the
    # small set has them at every length).
    "full": {"width": 512, "layers": 4, "ts": [1024, 4096, 16384, 32768], "repeats": 3,
             "budget_s": 60, "timeout_s": 2400, "scan_max_t": 1024},
}
_JAX_MODULES = ("jax", "flax", "optax", "longjax.models", "longjax.training.step")


def train_flops(impl: str, width: int, layers: int, t: int) -> int:
  """Model FLOPs of one train step (forward + backward) of `impl`'s decoder, for MFU.

  6 * T * the parameters in a matmul (the mixer's projections `w_*`, the MLP, the head), plus
  each layer's sequence mixing: causal attention's visible pairs (`flops.lm_train_flops`'s
  count), or the chunked linear-attention form's products (`chunked_linear_attention_flops`,
  Based adding its window's pairs). The `lax.scan` peers are charged the same model FLOPs as
  their mixer (MFU is about the model, not the program).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from longjax.layers import gla  # pylint: disable=g-import-not-at-top
  from longjax.layers import recurrent  # pylint: disable=g-import-not-at-top
  from longjax.ops import linear_attention as ops  # pylint: disable=g-import-not-at-top
  from longjax.models import MIXERS  # pylint: disable=g-import-not-at-top
  shape = lm.LMShape(width, layers, t, 1)
  model = lm.longjax_config(shape, model_overrides=IMPLS[impl]).model
  spec = MIXERS[model.mixers.split(",")[0].split("(")[0]]
  mixer = nnx.eval_shape(lambda: spec.build(model, model[spec.section], nnx.Rngs(0)))
  projections = sum(p.value.size for name, p in vars(mixer).items()
                    if name.startswith("w_") and isinstance(p, nnx.Param))
  attention_projections = 4 * width * shape.heads * lm.HEAD_DIM  # in lm.matmul_params
  dense = 6 * t * (lm.matmul_params(shape) + layers * (projections - attention_projections))
  if spec.name == ATTENTION:
    return dense + flops_lib.lm_train_flops(matmul_params=0, layers=layers, heads=shape.heads,
                                            head_dim=lm.HEAD_DIM, t=t, batch=1)
  if not isinstance(mixer, recurrent.RecurrentMixer):
    return dense  # Mamba's scan and S4D's FFT convolution: no matmul
  per_channel = isinstance(mixer, gla.GatedLinearAttention)
  chunk = mixer.chunk_size or (ops.DEFAULT_CHUNK_PER_CHANNEL if per_channel else ops.DEFAULT_CHUNK)
  mixing = flops_lib.chunked_linear_attention_flops(
      t, mixer.num_heads, mixer.key_dim, mixer.value_dim + int(mixer.normalize), min(chunk, t),
      backward=True)
  window = getattr(mixer, "window", 0)
  if window:  # Based's softmax branch: 2 products per pair, 3x for forward + backward
    mixing += 3 * 2 * 2 * mixer.num_heads * mixer.head_dim * flops_lib.window_pairs(t, window)
  return dense + layers * mixing


def build_hf_mamba(impl: str, shape: lm.LMShape):
  """HF `MambaForCausalLM` (hf_mamba) or `Mamba2ForCausalLM` (hf_mamba2) with the configuration
  of longjax's `mamba` / `mamba2` defaults at `shape`'s width and depth (float32, seed 0).

  Raises:
    processes.Skip: torch or transformers is not installed (the `bench` extra).
  """
  from longjax.benchmarks import peers  # pylint: disable=g-import-not-at-top
  from longjax.layers import mamba  # pylint: disable=g-import-not-at-top
  from longjax.layers import mamba2  # pylint: disable=g-import-not-at-top
  _, transformers = peers.import_transformers()
  common = dict(vocab_size=shape.vocab, hidden_size=shape.width, num_hidden_layers=shape.layers,
                tie_word_embeddings=False, use_bias=False, use_conv_bias=True, use_cache=False)
  if impl == "hf_mamba":
    c = mamba.defaults()
    return transformers.MambaForCausalLM(transformers.MambaConfig(
        state_size=c.state_dim, expand=c.expand, conv_kernel=c.conv_size, **common))
  c = mamba2.defaults()
  return transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
      num_heads=c.expand * shape.width // c.head_dim, head_dim=c.head_dim,
      state_size=c.state_dim, expand=c.expand, n_groups=c.groups, conv_kernel=c.conv_size,
      **common))


def _hf_case(impl: str, shape: lm.LMShape, *, repeats: int, budget_s: float) -> dict:
  model = build_hf_mamba(impl, shape)
  step = train._hf_step_timing(  # pylint: disable=protected-access
      shape, repeats=repeats, budget_s=budget_s, model=model)
  dec = decode._hf_timing(  # pylint: disable=protected-access
      shape, repeats=repeats, budget_s=budget_s, model=model, cache_arg="cache")
  return {"train": step, "decode": dec["decode"], "params": step["params"],
          "train_footprint_bytes": None}


def mixer_case(impl: str, width: int, layers: int, t: int, *, repeats: int, budget_s: float,
               memory_budget: int | None) -> dict:
  """Train step (tokens/s, footprint) and cached decode (ms/token) of `impl` at length t."""
  shape = lm.LMShape(width, layers, t, 1)
  if impl in HF_PEERS:
    result = _hf_case(impl, shape, repeats=repeats, budget_s=budget_s)
    step = result["train"]
    model_flops = train_flops(HF_PEERS[impl], width, layers, t)
    return {**result, "time_s": step["time_s"], "tokens_per_s": t / step["time_s"],
            "flops": model_flops, "gflops_per_s": model_flops / step["time_s"] / 1e9,
            "decode_ms_per_token": 1e3 * result["decode"]["time_s"] / decode.NEW_TOKENS}
  overrides = {"model_overrides": IMPLS[impl]}
  step = train._longjax_step_timing(  # pylint: disable=protected-access
      shape, overrides, repeats=repeats, budget_s=budget_s, memory_budget=memory_budget)
  dec = decode._longjax_timing(  # pylint: disable=protected-access
      shape, repeats=repeats, budget_s=budget_s, memory_budget=memory_budget, **overrides)
  model_flops = train_flops(impl, width, layers, t)
  return {"time_s": step["time_s"], "tokens_per_s": t / step["time_s"],
          "flops": model_flops, "gflops_per_s": model_flops / step["time_s"] / 1e9,
          "train_footprint_bytes": timing.footprint_bytes(step),
          "decode_ms_per_token": 1e3 * dec["decode"]["time_s"] / decode.NEW_TOKENS,
          "params": step["params"], "train": step, "decode": dec["decode"]}


def run(sizes: str, *, impls=ROWS, memory_budget: int | None,
        timeout_s: float | None = None, lengths=None) -> list[dict]:
  """Every (length, impl) case at `sizes`, each in a child process, in plan order."""
  cfg = SIZES[sizes]
  return suites.run_cases(__name__, plan(sizes, impls, memory_budget, lengths), desc="mixers",
                          jax_modules=_JAX_MODULES,
                          timeout_s=cfg["timeout_s"] if timeout_s is None else timeout_s)


def plan(sizes: str, impls=ROWS, memory_budget: int | None = None,
         lengths=None) -> list[dict]:
  """The (length, impl) cases of `sizes` (its lengths, or `lengths`: then every case runs, the
  lax.scan peers too), lengths outermost; skipped ones say why."""
  cfg = SIZES[sizes]
  cases = []
  for t in lengths or cfg["ts"]:
    for impl in impls:
      size = {"width": cfg["width"], "layers": cfg["layers"], "t": t}
      case = {"function": "mixer_case", "labels": {"impl": impl, **size},
              "kwargs": {"impl": impl, **size, "repeats": cfg["repeats"],
                         "budget_s": cfg["budget_s"], "memory_budget": memory_budget}}
      if not lengths and impl.endswith("_scan") and t > cfg.get("scan_max_t", t):
        case["skip"] = (f"the lax.scan peers run up to T={cfg['scan_max_t']} in the "
                        f"{sizes!r} set")
      cases.append(case)
  return cases


def _ok(r) -> bool:
  return r is not None and r.get("status") == "ok"


def _find(results, impl, t):
  return next((r for r in results if r["impl"] == impl and r["t"] == t), None)


def derive(results: list[dict], peak_gflops: float | None = None) -> dict:
  """Adds ratios in place (vs attention, vs the lax.scan peer, the train step's model FLOP/s
  vs the measured f32 matmul peak); returns the targets."""
  for r in results:
    r["fraction_of_peak"] = (r["gflops_per_s"] / peak_gflops
                             if peak_gflops and _ok(r) and r.get("gflops_per_s") else None)
    attention, scan = _find(results, ATTENTION, r["t"]), _find(results, f"{r['impl']}_scan",
                                                                  r["t"])
    ok = _ok(r)
    r["speedup_vs_attention"] = (r["tokens_per_s"] / attention["tokens_per_s"]
                                 if ok and _ok(attention) else None)
    r["memory_vs_attention"] = (r["train_footprint_bytes"] / attention["train_footprint_bytes"]
                                if ok and _ok(attention) and r.get("train_footprint_bytes")
                                else None)
    hf = next((_find(results, peer, r["t"]) for peer, ours in HF_PEERS.items()
               if ours == r["impl"]), None)
    r["speedup_vs_hf"] = r["tokens_per_s"] / hf["tokens_per_s"] if ok and _ok(hf) else None
    r["decode_vs_hf"] = (r["decode_ms_per_token"] / hf["decode_ms_per_token"]
                         if ok and _ok(hf) else None)
    r["speedup_vs_scan"] = (r["tokens_per_s"] / scan["tokens_per_s"]
                            if ok and _ok(scan) else None)
  return {"targets": targets(results)}


# Mamba's own bars (the SSM issue), at the lengths they name: its train step over the lax.scan
# recurrence's, and over softmax attention's of the same width and depth.
MAMBA_TARGETS = ((2048, "speedup_vs_scan", 2.0), (8192, "speedup_vs_scan", 2.0),
                 (2048, "speedup_vs_attention", 0.5), (8192, "speedup_vs_attention", 1.0))


def _target(name: str, value, bound: float, op: str, *, judged: bool = True) -> dict:
  """One row of the targets table: `value` against `bound` (op ">=" or "<="); "met" None when
  the value was not measured or the run does not reach the target's lengths (`judged`)."""
  met = None if value is None else (value >= bound if op == ">=" else value <= bound)
  return {"target": name, "measured": "not measured" if value is None else f"{value:.2f}",
          "met": met if judged else None}


def _hf_targets(results: list[dict]) -> list[dict]:
  """Against HF's Mamba models: Mamba's train step >= 1.5x, every decode no slower."""
  out = []
  for peer, ours in HF_PEERS.items():
    for t in sorted({r["t"] for r in results if r["impl"] == peer}):
      row, label = _find(results, ours, t), LABELS[peer].split(" (")[0]
      checks = [(f"{ours} decode ms/token <= {label}'s at T={t}", "decode_vs_hf", 1.0, "<=")]
      if peer == "hf_mamba":
        checks.insert(0, (f"{ours} train tokens/s >= 1.5x {label} at T={t}", "speedup_vs_hf",
                          1.5, ">="))
      for target, key, bound, op in checks:
        out.append(_target(target, None if row is None else row.get(key), bound, op))
  return out


def _mamba_targets(results: list[dict]) -> list[dict]:
  out = _hf_targets(results)
  for t, key, bound in MAMBA_TARGETS:
    row = _find(results, "mamba", t)
    if row is None:
      continue
    peer = "its lax.scan recurrence" if key == "speedup_vs_scan" else "softmax attention"
    out.append(_target(f"mamba train tokens/s >= {bound:g}x {peer} at T={t}", row.get(key),
                       bound, ">="))
  return out


def targets(results: list[dict]) -> list[dict]:
  """The issue's targets per recurrent mixer (auto), measured between the shortest and longest
  length of the run ("met" None where a target's lengths were not run), and Mamba's own."""
  out = _mamba_targets(results)
  ts = sorted({r["t"] for r in results})
  if not ts:
    return out
  short, long = ts[0], ts[-1]
  reach = long >= 32768 and short <= 1024  # the 1k -> 32k
  for name in RECURRENT:
    lo, hi = _find(results, name, short), _find(results, name, long)
    if not (_ok(lo) and _ok(hi)) or long == short:
      continue
    checks = [
        (f"{name} tokens/s at T={long} >= 0.9x at T={short} (flat)",
         hi["tokens_per_s"] / lo["tokens_per_s"], 0.9, ">="),
        (f"{name} tokens/s >= 5x softmax attention at T={long}",
         hi["speedup_vs_attention"], 5.0, ">="),
        (f"{name} decode ms/token at T={long} within 1.1x of T={short}",
         hi["decode_ms_per_token"] / lo["decode_ms_per_token"], 1.1, "<="),
        (f"{name} train memory at T={long} <= 1/4 of attention's",
         hi["memory_vs_attention"], 0.25, "<="),
    ]
    for target, value, bound, op in checks:
      out.append(_target(target + ("" if reach else " (issue: 1k -> 32k)"), value, bound, op,
                         judged=reach))
  return out


def markdown(results: list[dict], summary: dict) -> str:
  rows = []
  for r in results:
    ok = _ok(r)
    rows.append([r["t"], LABELS[r["impl"]], r.get("tokens_per_s") if ok else None,
                 r.get("speedup_vs_attention"), r.get("speedup_vs_scan"), r.get("speedup_vs_hf"),
                 reports.mib(r.get("train_footprint_bytes")) if ok else None,
                 r.get("memory_vs_attention"), r.get("gflops_per_s") if ok else None,
                 r.get("fraction_of_peak"), r.get("decode_ms_per_token") if ok else None,
                 "ok" if ok else f"{r.get('status')}: {r.get('reason', '')}"])
  widths = sorted({(r["width"], r["layers"]) for r in results})
  model = ", ".join(f"d{w} L{n}" for w, n in widths)
  return "\n".join([
      f"### Mixers: train step and cached decode ({model}, head dim {lm.HEAD_DIM}, batch 1)\n",
      "x attention: tokens/s over softmax attention's at the same T; x scan: over the same "
      "mixer's lax.scan recurrence; x HF: over HF's model of the same configuration (mixer-only "
      "rows); memory: the train step's compiled footprint (XLA's plan: none for torch).\n",
      reports.markdown_table(["T", "mixer", "train tokens/s", "x attention", "x scan", "x HF",
                              "train footprint (MiB)", "memory x attention",
                              "train GFLOP/s", "x f32 matmul peak",
                              f"decode ms/token ({decode.NEW_TOKENS} tokens)", "status"], rows),
      "\n### Targets\n",
      reports.targets_table(summary["targets"]) if summary["targets"] else
      "(no target's lengths were measured)"])


def plot(results: list[dict], stem: str) -> list[str]:
  """Train tokens/s and decode ms/token against T, one line per implementation."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for impl in ROWS:
    rows = sorted((r for r in results if r["impl"] == impl and _ok(r)), key=lambda r: r["t"])
    if rows:
      style = "o--" if impl.endswith("_scan") else "o-"
      for ax, key in zip(axes, ("tokens_per_s", "decode_ms_per_token")):
        ax.plot([r["t"] for r in rows], [r[key] for r in rows], style, label=LABELS[impl])
  for ax, ylabel in zip(axes, ("train tokens / s", "decode ms / token")):
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel(ylabel)
  axes[0].legend(fontsize=7)
  fig.suptitle("Sequence mixers against length (same run, same machine)")
  fig.tight_layout()
  path = f"{stem}_mixers.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return [path]


def run_suite(sizes: str, out: str, *, argv: list[str], make_plots: bool = False,
              memory_budget_gb: float | None = None, timeout_s: float | None = None,
              impls=ROWS, lengths=None, **unused) -> str:
  """Measures the peak, runs the mixers suite, writes OUT (JSON), OUT.md and, with plots, PNG."""
  del unused
  return suites.run_suite_with(
      "mixers", sizes, out, argv=argv, memory_budget_gb=memory_budget_gb,
      run=lambda budget: run(sizes, impls=impls, memory_budget=budget, timeout_s=timeout_s,
                             lengths=lengths),
      derive=derive, markdown=markdown,
      plot=plot if make_plots else None)
