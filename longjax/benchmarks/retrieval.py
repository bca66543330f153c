"""`--suite=retrieval`: decode ms/token against the cache length, full attention vs retrieval.

One decoder (`longjax.benchmarks.lm`: d512, head dim 64, RoPE), batch 1, greedy, its layers all
softmax attention (a `KVCache` read whole at every step), all landmark attention (its own
block plus the top-k blocks its landmarks score highest, `longjax.layers.landmark`), or softmax
attention under a training-free retrieval policy (InfLLM, TokenSelect: sinks + window + a
selection, `longjax.layers.retrieval`). Each case
times `NEW_TOKENS` decode steps as one `lax.scan` program, the cache donated (updated in place),
starting from a cache holding C tokens. The cache is filled with random keys and values rather
than by a prefill: what a step costs depends on the cache's length, not on what it holds, and a
prefill of 64k-128k tokens would take most of the suite's time on a CPU.
"""

from longjax.benchmarks import decode
from longjax.benchmarks import lm
from longjax.benchmarks import reports
from longjax.benchmarks import suites
from longjax.benchmarks import timing

NEW_TOKENS = decode.NEW_TOKENS
IMPLS = ("attention", "landmark", "infllm", "infllm_host", "tokenselect", "hip", "duo")
FULL = "attention"
LABELS = {"attention": "full attention (KV cache)",
          "landmark": "landmark, top-4 blocks of 64 (longjax.layers.landmark)",
          "infllm": "InfLLM, 16 blocks of 128 + 128 sinks + 2k window",
          "tokenselect": "TokenSelect, 2048 tokens + 128 sinks + 2k window",
          "infllm_host": "InfLLM as above, keys and values in host memory, 64 hot blocks",
          "hip": "HiP, 16 blocks of 128 + 128 sinks + 2k window",
          "duo": "DuoAttention-style, half the KV heads whole, others 128 sinks + 2k window"}
# The training-free policies' budget: 2048 selected + 128 sink + 2048 window tokens per query.
_POLICY = {"attention.retrieval_top_k": 2048, "attention.retrieval_window": 2048,
           "attention.retrieval_sinks": 128, "attention.retrieval_block": 128}
# Model overrides per implementation (`lm.longjax_config`).
OVERRIDES = {"attention": {}, "landmark": {"mixers": "landmark", "landmark.block_size": 64,
                                           "landmark.top_k": 4},
             "infllm": {"attention.retrieval": "infllm", **_POLICY},
             "tokenselect": {"attention.retrieval": "tokenselect", **_POLICY},
             "infllm_host": {"attention.retrieval": "infllm", "attention.retrieval_cache": "host",
                             "attention.retrieval_hot_blocks": 64, **_POLICY},
             "hip": {"attention.retrieval": "hip", **_POLICY},
             "duo": {"attention.retrieval": "duo", **_POLICY}}


def _overrides(impl: str, layers: int, kv_heads: int) -> dict:
  """OVERRIDES, with DuoAttention's head split fixed to the first half of each layer's KV
  heads (a random model has nothing to calibrate on; the cost depends only on the count)."""
  if impl != "duo":
    return OVERRIDES[impl]
  half = ",".join(map(str, range(max(kv_heads // 2, 1))))
  return {**OVERRIDES[impl],
          "attention.retrieval_head_split": ";".join(f"{i}:{half}" for i in range(layers))}

SIZES = {
    "tiny": {"shapes": [lm.LMShape(64, 2, c, 1) for c in (512, 2048)], "repeats": 2,
             "budget_s": 10, "timeout_s": 300},
    "small": {"shapes": [lm.LMShape(512, 8, c, 1) for c in (4096, 16384)], "repeats": 3,
              "budget_s": 30, "timeout_s": 900},
    "full": {"shapes": [lm.LMShape(512, 8, c, 1) for c in (4096, 16384, 65536, 131072)],
             "repeats": 3, "budget_s": 60, "timeout_s": 1800},
}
_JAX_MODULES = ("jax", "flax", "longjax.models")


def filled_cache(model, context: int, capacity: int):
  """`model.init_cache(1, capacity)` holding `context` tokens of random keys and values."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from longjax.ops import landmarks  # pylint: disable=g-import-not-at-top
  end = (landmarks.landmarked_length(context, model.landmark_block) if model.landmark_block
         else context)
  filled = []
  for i, cache in enumerate(model.init_cache(1, capacity)):
    k1, k2, k3 = jax.random.split(jax.random.key(i), 3)
    fields = {"k": jax.random.normal(k1, cache.k.shape, cache.k.dtype),
              "v": jax.random.normal(k2, cache.v.shape, cache.v.dtype),
              "end": jnp.asarray(end, jnp.int32)}
    if hasattr(cache, "landmarks"):  # the landmark keys as the layer would have stored them
      fields["landmarks"] = jax.random.normal(k3, cache.landmarks.shape, cache.landmarks.dtype)
    if hasattr(cache, "policy"):  # a retrieval policy's state: random where it is floats
      fields["policy"] = {
          name: (jax.random.normal(jax.random.fold_in(k3, j), a.shape, a.dtype)
                 if jnp.issubdtype(a.dtype, jnp.floating) else a)
          for j, (name, a) in enumerate(sorted(cache.policy.items()))}
    if hasattr(cache, "positions"):
      fields["positions"] = jnp.broadcast_to(jnp.arange(cache.k.shape[1], dtype=jnp.int32),
                                             cache.positions.shape)
    # Where the cache put an array (host memory for an offloaded cache), its filling goes too.
    fields = {name: jax.device_put(value, getattr(cache, name).sharding)
              if name in ("k", "v") else value for name, value in fields.items()}
    filled.append(dataclasses.replace(cache, **fields))
  return tuple(filled)


def device_bytes(cache) -> int:
  """Bytes of a cache's arrays in device memory (an offloaded cache's keys and values are in
  host memory)."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(x.nbytes for x in jax.tree.leaves(cache)
             if getattr(x.sharding, "memory_kind", "device") in ("device", None))


def retrieval_case(impl: str, width: int, layers: int, t: int, batch: int, *, repeats: int,
                   budget_s: float, memory_budget: int | None) -> dict:
  """Decode NEW_TOKENS greedily from a cache holding `t` tokens: ms/token and memory."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from longjax.models import generate  # pylint: disable=g-import-not-at-top
  shape = lm.LMShape(width, layers, t, batch)
  graphdef, params, _ = lm.build_longjax(
      shape, model_overrides=_overrides(impl, layers, shape.heads))
  model = nnx.merge(graphdef, params)

  def fresh_args():  # the donated cache is consumed by each call
    cache = filled_cache(model, t, t + NEW_TOKENS)
    return jax.block_until_ready((params, cache, jnp.zeros((batch,), jnp.int32)))

  # The cache lowered with also gives the device bytes: one more full cache built just to count
  # them was another 4-6 GiB at 128k (TokenSelect's 128k case ran out of memory with it).
  args = fresh_args()
  on_device = device_bytes(args[1])
  compiled = jax.jit(decode.greedy_decode(graphdef), donate_argnums=1).lower(*args).compile()
  del args
  memory = timing.compiled_memory(compiled)
  if memory_budget is not None and timing.footprint_bytes(memory) > memory_budget:
    raise timing.OutOfBudget(f"decode needs {timing.footprint_bytes(memory) / 2**30:.1f} GiB")
  result = timing.time_with_setup(compiled, fresh_args, repeats=repeats, budget_s=budget_s,
                                  sync=jax.block_until_ready)
  return {**result, **memory, "decode_ms_per_token": 1e3 * result["time_s"] / NEW_TOKENS,
          "cache_bytes": generate.cache_bytes(graphdef, params, batch, t + NEW_TOKENS),
          "device_cache_bytes": on_device,
          "params": lm.count(params)}


def run(sizes: str, *, impls=IMPLS, memory_budget: int | None,
        timeout_s: float | None = None) -> list[dict]:
  """Runs every (context, impl) case at `sizes`, each in a child process."""
  return lm.run_cases(__name__, "retrieval_case", SIZES[sizes], impls, peer=None,
                      memory_budget=memory_budget, timeout_s=timeout_s,
                      jax_modules=_JAX_MODULES)


def derive(results: list[dict]) -> dict:
  """Adds, per row, the speed-up over full attention at the same context and the slow-down
  from the shortest context; returns the issue's targets."""
  ok = [r for r in results if r.get("status") == "ok"]
  for r in results:
    full = next((p for p in ok if p["impl"] == FULL and p["t"] == r["t"]), None)
    first = min((p for p in ok if p["impl"] == r["impl"]), key=lambda p: p["t"], default=None)
    good = r.get("status") == "ok"
    r["speedup_vs_full"] = (full["decode_ms_per_token"] / r["decode_ms_per_token"]
                            if good and full else None)
    r["vs_shortest"] = (r["decode_ms_per_token"] / first["decode_ms_per_token"]
                        if good and first else None)
  targets = []
  for impl in (i for i in IMPLS if i != FULL and any(r["impl"] == i for r in results)):
    rows = sorted((r for r in ok if r["impl"] == impl), key=lambda r: r["t"])
    at = {r["t"]: r for r in rows}
    flat = at.get(65536) and at.get(4096)
    targets.append({
        "target": f"{impl}: ms/token at a 64k cache within 1.5x of a 4k cache",
        "measured": (f"{at[65536]['decode_ms_per_token']:.2f} vs "
                     f"{at[4096]['decode_ms_per_token']:.2f} ms/token "
                     f"({at[65536]['decode_ms_per_token'] / at[4096]['decode_ms_per_token']:.2f}x)"
                     if flat else "not measured at these sizes"),
        "met": (at[65536]["decode_ms_per_token"] <= 1.5 * at[4096]["decode_ms_per_token"]
                if flat else None)})
    fast = at.get(65536)
    targets.append({
        "target": f"{impl}: >= 5x faster than full attention at a 64k cache",
        "measured": (f"{fast['speedup_vs_full']:.1f}x" if fast and fast["speedup_vs_full"]
                     else "not measured at these sizes"),
        "met": (fast["speedup_vs_full"] >= 5.0
                if fast and fast["speedup_vs_full"] else None)})
  return {"targets": targets}


def markdown(results: list[dict], summary: dict) -> str:
  rows = []
  for r in results:
    ok = r.get("status") == "ok"
    rows.append([f"d{r['width']} L{r['layers']}", r["t"], LABELS[r["impl"]],
                 r.get("decode_ms_per_token") if ok else None, r.get("speedup_vs_full"),
                 r.get("vs_shortest"),
                 r["cache_bytes"] / 2**20 if ok else None,
                 r["device_cache_bytes"] / 2**20 if ok and "device_cache_bytes" in r else None,
                 r.get("rss_peak_mib"),
                 "ok" if ok else f"{r.get('status')}: {r.get('reason', '')}"])
  return "\n".join([
      f"### Decode from a long cache (batch 1, greedy, {NEW_TOKENS} new tokens)\n",
      "x full: full attention's ms/token over this row's at the same context (> 1: faster); "
      "x shortest: this row's ms/token over its own at the shortest context.\n",
      reports.markdown_table(["model", "context", "implementation", "decode ms/token",
                              "x full", "x shortest", "cache (MiB)", "on device (MiB)",
                              "peak RSS (MiB)",
                              "status"], rows),
      "\n### Targets\n",
      reports.targets_table(summary["targets"])])


def plot(results: list[dict], stem: str) -> list[str]:
  """Decode ms/token against the context length, one line per implementation."""
  return [reports.plot_decode_vs_context(results, IMPLS, LABELS, f"{stem}_retrieval.png",
                                         title="Decoding from a long cache, batch 1", log_y=True)]


def run_suite(sizes: str, out: str, *, argv: list[str], make_plots: bool = False,
              memory_budget_gb: float | None = None, timeout_s: float | None = None,
              impls=IMPLS, **unused) -> str:
  """Runs the retrieval suite; writes OUT (JSON), OUT.md and, with plots, a PNG."""
  del unused
  return suites.run_suite_with(
      "retrieval", sizes, out, argv=argv, memory_budget_gb=memory_budget_gb,
      run=lambda budget: run(sizes, impls=impls, memory_budget=budget, timeout_s=timeout_s),
      derive=lambda results, peak_gflops: derive(results), markdown=markdown,
      plot=plot if make_plots else None)
