"""`--suite=decode`: prefill tokens/s and decode ms/token with the KV cache, longjax vs HF Llama.

Same decoder on both sides (`longjax.benchmarks.lm`), batch 1, greedy. At each context length C:
  * prefill: one forward pass over C prompt tokens that fills the cache (tokens/s);
  * decode: `NEW_TOKENS` more tokens one at a time from that cache (ms/token).
longjax runs what `longjax.models.generate` runs: a jitted prefill, then the decode steps as one
`lax.scan` program (cache donated, so it is updated in place). HF runs `LlamaForCausalLM` under
`torch.inference_mode()` with its `DynamicCache`: a prefill call, then a Python loop of one-token
calls with `past_key_values`, the loop `generate` runs without its logits processors.
"""

from longjax.benchmarks import suites
from longjax.benchmarks import lm
from longjax.benchmarks import reports
from longjax.benchmarks import timing

NEW_TOKENS = 32
IMPLS = ("longjax", "hf_llama")
PEER = "hf_llama"
LABELS = {"longjax": "longjax (f32)", "hf_llama": "HF LlamaForCausalLM (torch, f32)"}

SIZES = {
    "tiny": {"shapes": [lm.LMShape(64, 2, 64, 1)], "repeats": 2, "budget_s": 10,
             "timeout_s": 300},
    "small": {"shapes": [lm.LMShape(512, 8, 1024, 1), lm.LMShape(512, 8, 4096, 1)],
              "repeats": 3, "budget_s": 60, "timeout_s": 900},
    # Each timed decode needs a fresh prefill (the cache is consumed): HF's at 32k would take
    # ~10 minutes per repeat here, so the CPU set stops at 16k.
    "full": {"shapes": [lm.LMShape(512, 8, c, 1) for c in (1024, 4096, 16384)],
             "repeats": 3, "budget_s": 120, "timeout_s": 1800},
}
_JAX_MODULES = ("jax", "flax", "longjax.models")


def _prompt(shape: lm.LMShape):
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.default_rng(0).integers(0, shape.vocab, (shape.batch, shape.t),
                                           dtype=np.int32)


def decode_case(impl: str, width: int, layers: int, t: int, batch: int, *, repeats: int,
                budget_s: float, memory_budget: int | None) -> dict:
  """Prefill `t` tokens, then decode NEW_TOKENS greedily: times of both phases."""
  shape = lm.LMShape(width, layers, t, batch)
  if impl == PEER:
    result = _hf_timing(shape, repeats=repeats, budget_s=budget_s)
  else:
    result = _longjax_timing(shape, repeats=repeats, budget_s=budget_s,
                             memory_budget=memory_budget)
  result["prefill_tokens_per_s"] = shape.batch * shape.t / result["prefill"]["time_s"]
  result["decode_ms_per_token"] = 1e3 * result["decode"]["time_s"] / NEW_TOKENS
  result["time_s"] = result["decode"]["time_s"]
  return result


def greedy_decode(graphdef):
  """(params, cache, token [B]) -> (tokens [NEW_TOKENS, B], cache): NEW_TOKENS greedy decode
  steps of the model as one `lax.scan`, what `longjax.models.generate` runs after its prefill.
  Returning the cache lets a donated one be updated in place."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def decode(params, cache, token):
    model = nnx.merge(graphdef, params)

    def one(carry, _):
      cache, token = carry
      logits, cache = model(token[:, None], cache=cache)
      nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
      return (cache, nxt), nxt
    (cache, _), tokens = jax.lax.scan(one, (cache, token), None, length=NEW_TOKENS)
    return tokens, cache

  return decode


def _longjax_timing(shape, *, repeats, budget_s, memory_budget, **config_kwargs) -> dict:
  """longjax's prefill and decode timings; `config_kwargs` go to `lm.longjax_config`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, params, _ = lm.build_longjax(shape, **config_kwargs)
  prompt = jnp.asarray(_prompt(shape))

  def prefill(params, prompt):
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(shape.batch, shape.t + NEW_TOKENS)
    logits, cache = model(prompt, cache=cache)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache

  decode = greedy_decode(graphdef)
  prefill_timing = timing.time_jax(prefill, (params, prompt), repeats=repeats,
                                   budget_s=budget_s, memory_budget_bytes=memory_budget)
  prefill_fn = jax.jit(prefill)
  decode_fn = jax.jit(decode, donate_argnums=1)  # the cache is updated in place
  first, cache = prefill_fn(params, prompt)
  decode_compiled = decode_fn.lower(params, cache, first).compile()
  memory = timing.compiled_memory(decode_compiled)

  def fresh_args():  # the donated cache is consumed by each call: prefill again, untimed
    token, cache = prefill_fn(params, prompt)
    return jax.block_until_ready((params, cache, token))
  decode_timing = timing.time_with_setup(decode_compiled, fresh_args, repeats=repeats,
                                         budget_s=budget_s, sync=jax.block_until_ready)
  return {"prefill": prefill_timing, "decode": {**decode_timing, **memory},
          "temp_bytes": prefill_timing.get("temp_bytes"), "params": lm.count(params)}


def _hf_timing(shape, *, repeats, budget_s, model=None, cache_arg="past_key_values") -> dict:
  """Prefill and decode timings of an HF causal LM (`model`; default the Llama of `shape`),
  whose cache is the argument and output field `cache_arg` (Mamba's: "cache")."""
  model = lm.build_hf_llama(shape) if model is None else model
  torch = __import__("torch")
  model.eval()
  prompt = torch.from_numpy(_prompt(shape)).long()

  def prefill():
    out = model(input_ids=prompt, use_cache=True)
    return out.logits[:, -1].argmax(-1, keepdim=True), getattr(out, cache_arg)

  def decode(token, cache):
    tokens = []
    for _ in range(NEW_TOKENS):
      out = model(input_ids=token, use_cache=True, **{cache_arg: cache})
      cache = getattr(out, cache_arg)
      token = out.logits[:, -1].argmax(-1, keepdim=True)
      tokens.append(token)
    return torch.cat(tokens, dim=1)

  with torch.inference_mode():
    prefill_timing = timing.time_callable(prefill, repeats=repeats, budget_s=budget_s)
    decode_timing = timing.time_with_setup(decode, prefill, repeats=repeats, budget_s=budget_s)
  return {"prefill": prefill_timing, "decode": decode_timing,
          "params": sum(p.numel() for p in model.parameters()),
          "torch_threads": torch.get_num_threads()}


# ---------------------------------------------------------------------------------------------
# The suite (parent side).


def run(sizes: str, *, impls=IMPLS, memory_budget: int | None,
        timeout_s: float | None = None) -> list[dict]:
  """Runs every (shape, impl) case at `sizes`, each in a child process."""
  return lm.run_cases(__name__, "decode_case", SIZES[sizes], impls, peer=PEER,
                      memory_budget=memory_budget, timeout_s=timeout_s,
                      jax_modules=_JAX_MODULES)


def derive(results: list[dict]) -> dict:
  """Adds the ratios to the HF peer in place (> 1: longjax faster); returns the targets."""
  for r in results:
    peer = next((p for p in results if p["impl"] == PEER and p["t"] == r["t"]
                 and p["width"] == r["width"] and p["layers"] == r["layers"]), None)
    both = r.get("status") == "ok" and peer is not None and peer.get("status") == "ok"
    r["decode_speedup_vs_hf"] = (peer["decode_ms_per_token"] / r["decode_ms_per_token"]
                                 if both else None)
    r["prefill_speedup_vs_hf"] = (r["prefill_tokens_per_s"] / peer["prefill_tokens_per_s"]
                                  if both else None)
  at4k = next((r for r in results if r["impl"] == "longjax" and r["t"] == 4096
               and r.get("decode_speedup_vs_hf") is not None), None)
  target = {"target": "longjax decode ms/token <= HF cached generation's at 4k context",
            "measured": ("not measured at these sizes" if at4k is None else
                         f"{at4k['decode_ms_per_token']:.1f} vs HF "
                         f"{at4k['decode_ms_per_token'] * at4k['decode_speedup_vs_hf']:.1f} "
                         f"ms/token ({at4k['decode_speedup_vs_hf']:.2f}x)"),
            "met": None if at4k is None else at4k["decode_speedup_vs_hf"] >= 1.0}
  return {"targets": [target]}


def markdown(results: list[dict], summary: dict) -> str:
  rows = []
  for r in results:
    ok = r.get("status") == "ok"
    rows.append([f"d{r['width']} L{r['layers']}", r["t"], LABELS[r["impl"]],
                 r.get("prefill_tokens_per_s") if ok else None, r.get("prefill_speedup_vs_hf"),
                 r.get("decode_ms_per_token") if ok else None, r.get("decode_speedup_vs_hf"),
                 r.get("rss_peak_mib"),
                 "ok" if ok else f"{r.get('status')}: {r.get('reason', '')}"])
  return "\n".join([
      f"### Prefill and decode (batch 1, greedy, {NEW_TOKENS} new tokens)\n",
      "Ratios: HF time over longjax time in the same run (> 1: longjax faster).\n",
      reports.markdown_table(["model", "context", "implementation", "prefill tokens/s", "x HF",
                              "decode ms/token", "x HF", "peak RSS (MiB)", "status"], rows),
      "\n### Targets\n",
      reports.targets_table(summary["targets"])])


def plot(results: list[dict], stem: str) -> list[str]:
  """Decode ms/token against the context length, one line per implementation."""
  return [reports.plot_decode_vs_context(
      results, IMPLS, LABELS, f"{stem}_decode.png",
      title="Cached decoding, batch 1 (same run, same machine)")]


def run_suite(sizes: str, out: str, *, argv: list[str], make_plots: bool = False,
              memory_budget_gb: float | None = None, timeout_s: float | None = None,
              impls=IMPLS, **unused) -> str:
  """Measures the peak, runs the decode suite, writes OUT (JSON), OUT.md and, with plots, PNG."""
  del unused
  return suites.run_suite_with(
      "decode", sizes, out, argv=argv, memory_budget_gb=memory_budget_gb,
      run=lambda budget: run(sizes, impls=impls, memory_budget=budget, timeout_s=timeout_s),
      derive=lambda results, peak_gflops: derive(results), markdown=markdown,
      plot=plot if make_plots else None)
