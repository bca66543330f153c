"""`--suite=train`: tokens/s, MFU and memory of one LM train step, longjax vs HF Llama (PyTorch).

Both sides run the same decoder (`longjax.benchmarks.lm`: same parameters, same function) on the
same random tokens: forward, mean cross-entropy, backward, global-norm clipping at 1.0, one
AdamW step. longjax runs `longjax.training.step.train_step`, jitted, the step the trainer runs
(without packed-document segment ids, which the HF model has no equivalent for); HF runs
`LlamaForCausalLM` in eager PyTorch with SDPA attention and `torch.optim.AdamW`, as a
researcher would write it.

MFU = model FLOPs / time / the jitted f32 matmul peak measured in the same run, with model
FLOPs = 6 * matmul parameters * tokens + 3 * causal attention forward FLOPs (fwd + bwd, no
recomputation: `flops.lm_train_flops`).
"""

from longjax.benchmarks import suites
from longjax.benchmarks import flops as flops_lib
from longjax.benchmarks import lm
from longjax.benchmarks import reports
from longjax.benchmarks import timing

# Implementation name -> longjax config overrides; "hf_llama" is the PyTorch peer.
LONGJAX = {"longjax": {}, "longjax_bf16": {"dtype": "bfloat16"}}
PEER = "hf_llama"
IMPLS = (*LONGJAX, PEER)
LABELS = {"longjax": "longjax (f32)", "longjax_bf16": "longjax (bf16 compute)",
          "hf_llama": "HF LlamaForCausalLM (torch, f32)"}

SIZES = {
    "tiny": {"shapes": [lm.LMShape(64, 2, 64, 2)], "repeats": 2, "budget_s": 10,
             "timeout_s": 300},
    "small": {"shapes": [lm.LMShape(256, 4, 512, 4), lm.LMShape(512, 8, 1024, 4)],
              "repeats": 3, "budget_s": 60, "timeout_s": 900},
    # Two rounds: on this shared machine a case's speed moved by up to 14% between two runs of
    # the suite while interleaved timings in one process agreed (docs/benchmarks.md).
    "full": {"shapes": [lm.LMShape(256, 4, 512, 8), lm.LMShape(512, 8, 1024, 4),
                        lm.LMShape(1024, 8, 1024, 2), lm.LMShape(512, 4, 8192, 1)],
             "repeats": 4, "budget_s": 120, "timeout_s": 1800, "rounds": 2},
}
_JAX_MODULES = ("jax", "flax", "optax", "longjax.models", "longjax.training.step")
# Untimed steps before the timed ones, on both sides: a training process's steady state. The
# first steps are slower while the allocator grows its heap to the step's high-water mark
# (host_memory): one warm-up left a 7.9 s step among 4.9-5.1 s ones at d512.
WARMUP_STEPS = 3


def _shape(kw) -> lm.LMShape:
  return lm.LMShape(kw["width"], kw["layers"], kw["t"], kw["batch"])


def _tokens(shape: lm.LMShape):
  """[B, T + 1] int32 tokens, the same on both sides (numpy's generator, seed 0)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.default_rng(0).integers(0, shape.vocab, (shape.batch, shape.t + 1),
                                           dtype=np.int32)


def model_flops(shape: lm.LMShape) -> int:
  return flops_lib.lm_train_flops(
      matmul_params=lm.matmul_params(shape), layers=shape.layers, heads=shape.heads,
      head_dim=lm.HEAD_DIM, t=shape.t, batch=shape.batch)


# ---------------------------------------------------------------------------------------------
# Cases (run in the child).


def train_case(impl: str, width: int, layers: int, t: int, batch: int, *, repeats: int,
               budget_s: float, memory_budget: int | None) -> dict:
  """One train step of `impl` on the decoder of this shape: time, tokens/s, model FLOP/s."""
  shape = _shape(locals())
  if impl == PEER:
    result = _hf_step_timing(shape, repeats=repeats, budget_s=budget_s)
  else:
    result = _longjax_step_timing(shape, LONGJAX[impl], repeats=repeats, budget_s=budget_s,
                                  memory_budget=memory_budget)
  tokens = shape.batch * shape.t
  result.update(tokens=tokens, tokens_per_s=tokens / result["time_s"],
                flops=model_flops(shape), gflops_per_s=model_flops(shape) / result["time_s"] / 1e9)
  return result


def _longjax_step_timing(shape, overrides, *, repeats, budget_s, memory_budget) -> dict:
  import functools  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from longjax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from longjax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  graphdef, params, cfg = lm.build_longjax(shape, **overrides)
  tx, schedule = state_lib.make_model_optimizer(cfg.model, cfg.train, vocab_size=shape.vocab)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=tx.init(params))
  tokens = jnp.asarray(_tokens(shape))
  positions = jnp.broadcast_to(jnp.arange(shape.t, dtype=jnp.int32), (shape.batch, shape.t))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
           "segment_ids": None, "weights": jnp.ones((shape.batch, shape.t), jnp.float32)}
  step = functools.partial(step_lib.train_step, graphdef, tx, schedule)
  # The state is donated and carried from step to step, as the trainer runs it.
  measured = timing.time_jax(step, (state, batch), repeats=repeats, budget_s=budget_s,
                             memory_budget_bytes=memory_budget, carry=True, warmup=WARMUP_STEPS)
  return {**measured, "params": lm.count(params)}


def _hf_step_timing(shape, *, repeats, budget_s, model=None) -> dict:
  """An AdamW train step of an HF causal LM (`model`; default the Llama of `shape`)."""
  model = lm.build_hf_llama(shape) if model is None else model
  torch = __import__("torch")
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.1)
  tokens = torch.from_numpy(_tokens(shape)).long()
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def step():
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, shape.vocab).float(),
                                             targets.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  measured = timing.time_callable(step, repeats=repeats, budget_s=budget_s, warmup=WARMUP_STEPS)
  return {**measured, "params": sum(p.numel() for p in model.parameters()),
          "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# The suite (parent side).


def run(sizes: str, *, impls=IMPLS, memory_budget: int | None,
        timeout_s: float | None = None) -> list[dict]:
  """Runs every (shape, impl) case at `sizes`, each in a child process.

  Size sets with "rounds" > 1 run all cases that many times, the implementations in reverse
  order every other round, and each case keeps its fastest round ("round_times_s" lists them
  all): the same treatment for longjax and the peer, so slow spells of a shared machine do not
  land on one side of a ratio.
  """
  cfg = SIZES[sizes]
  best = {}
  for round_index in range(cfg.get("rounds", 1)):
    order = tuple(impls) if round_index % 2 == 0 else tuple(reversed(impls))
    for row in lm.run_cases(__name__, "train_case", cfg, order, peer=PEER,
                            memory_budget=memory_budget, timeout_s=timeout_s,
                            jax_modules=_JAX_MODULES):
      key = (row["impl"], tuple(_size(row).values()))
      kept = best.setdefault(key, dict(row, round_times_s=[]))
      if row.get("status") == "ok":
        kept["round_times_s"].append(row["time_s"])
        if kept.get("status") != "ok" or row["time_s"] < kept["time_s"]:
          best[key] = dict(row, round_times_s=kept["round_times_s"])
  shapes = [(s.width, s.layers, s.t, s.batch) for s in cfg["shapes"]]
  return sorted(best.values(), key=lambda r: (shapes.index(tuple(_size(r).values())),
                                              list(impls).index(r["impl"])))


def _same_shape(a: dict, b: dict) -> bool:
  return all(a[k] == b[k] for k in ("width", "layers", "t", "batch"))


def derive(results: list[dict], peak_gflops: float | None) -> dict:
  """Adds MFU and the ratio to the HF peer to each result in place; returns the targets."""
  for r in results:
    ok = r.get("status") == "ok"
    r["mfu"] = r["gflops_per_s"] / peak_gflops if ok and peak_gflops else None
    peer = next((p for p in results if p["impl"] == PEER and _same_shape(p, r)), None)
    r["speedup_vs_hf"] = (r["tokens_per_s"] / peer["tokens_per_s"]
                          if ok and peer and peer.get("status") == "ok" else None)
  return {"targets": targets(results)}


def targets(results: list[dict]) -> list[dict]:
  """The issue's train targets with what this run measured; "met" None where not measured."""
  out = []
  for t in (1024, 8192):
    rows = [r for r in results if r["impl"] == "longjax" and r["t"] == t
            and r.get("speedup_vs_hf") is not None]
    worst = min(rows, key=lambda r: r["speedup_vs_hf"], default=None)
    out.append({"target": f"longjax train step >= 1.0x HF Llama tokens/s at T={t}",
                "measured": ("not measured at these sizes" if worst is None else
                             f"{worst['speedup_vs_hf']:.2f}x "
                             f"({lm.LMShape(**_size(worst)).name()})"),
                "met": None if worst is None else worst["speedup_vs_hf"] >= 1.0})
  rows = [r for r in results if r["impl"] in LONGJAX and r["width"] >= 512
          and r.get("mfu") is not None]
  best = max(rows, key=lambda r: r["mfu"], default=None)
  worst = min((r for r in rows if r["impl"] == "longjax"), key=lambda r: r["mfu"], default=None)
  out.append({"target": "longjax MFU >= 60% of the f32 matmul peak at width >= 512",
              "measured": ("not measured at these sizes" if worst is None else
                           f"{100 * worst['mfu']:.0f}% f32 at worst "
                           f"({lm.LMShape(**_size(worst)).name()}); best "
                           f"{100 * best['mfu']:.0f}% ({LABELS[best['impl']]})"),
              "met": None if worst is None else worst["mfu"] >= 0.6})
  return out


def _size(r: dict) -> dict:
  return {k: r[k] for k in ("width", "layers", "t", "batch")}


def markdown(results: list[dict], summary: dict) -> str:
  m = reports.mib
  rows = []
  for r in results:
    shown = r.get("status") == "ok"
    rows.append([lm.LMShape(**_size(r)).name(), LABELS[r["impl"]],
                 r.get("tokens_per_s") if shown else None, r.get("speedup_vs_hf"),
                 r.get("gflops_per_s") if shown else None,
                 None if r.get("mfu") is None else 100 * r["mfu"],
                 " / ".join(f"{t:.3g}" for t in r.get("round_times_s") or []) or None,
                 m(r.get("temp_bytes")), r.get("rss_peak_mib"), r.get("params"),
                 "ok" if shown else f"{r.get('status')}: {r.get('reason', '')}"])
  lines = ["### Train step (forward, loss, backward, clip, AdamW)\n",
           "Ratios are tokens/s over the HF model's in the same run (> 1: longjax faster); "
           "with several rounds, each case's fastest. MFU: model FLOPs (6 x matmul params x "
           "tokens + causal attention fwd+bwd) / time / the f32 matmul peak above.\n",
           reports.markdown_table(
               ["shape", "implementation", "tokens/s", "x HF", "GFLOP/s", "MFU %",
                "step time per round (s)", "compiled temp (MiB)", "peak RSS (MiB)", "params",
                "status"], rows),
           "\n### Targets\n",
           reports.targets_table(summary["targets"])]
  return "\n".join(lines)


def plot(results: list[dict], stem: str) -> list[str]:
  """Tokens/s relative to the HF model's, per shape and implementation (grouped bars)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  shapes = []
  for r in results:
    name = lm.LMShape(**_size(r)).name()
    if name not in shapes:
      shapes.append(name)
  impls = [i for i in LONGJAX if any(r["impl"] == i for r in results)]
  fig, ax = plt.subplots(figsize=(1.8 + 2.2 * len(shapes), 4))
  width = 0.8 / max(1, len(impls))
  for k, impl in enumerate(impls):
    ys = []
    for name in shapes:
      r = next((r for r in results if r["impl"] == impl
                and lm.LMShape(**_size(r)).name() == name), None)
      ys.append((r or {}).get("speedup_vs_hf") or 0.0)
    bars = ax.bar([i + k * width for i in range(len(shapes))], ys, width, label=LABELS[impl])
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
  ax.axhline(1.0, color="tab:green", label=LABELS[PEER] + " = 1")
  ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(shapes))], shapes)
  ax.set_ylabel("train tokens/s relative to HF")
  ax.set_title("LM train step throughput (same run, same machine)")
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  path = f"{stem}_train.png"
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return [path]


def run_suite(sizes: str, out: str, *, argv: list[str], make_plots: bool = False,
              memory_budget_gb: float | None = None, timeout_s: float | None = None,
              impls=IMPLS, **unused) -> str:
  """Measures the peak, runs the train suite, writes OUT (JSON), OUT.md and, with plots, PNG."""
  del unused
  return suites.run_suite_with(
      "train", sizes, out, argv=argv, memory_budget_gb=memory_budget_gb,
      run=lambda budget: run(sizes, impls=impls, memory_budget=budget, timeout_s=timeout_s),
      derive=derive, markdown=markdown, plot=plot if make_plots else None)
