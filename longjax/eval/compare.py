"""Compare evaluation-time methods on one trained model: the same documents, one overlay plot.

A method is a named set of config overrides applied at evaluation time, without retraining
(RoPE scalings, attention windows, logit scaling, ...). `EVAL_METHODS` maps each name to a
function `(config, target_length) -> {dotted field: value}`; `target_length` is the longest
evaluation length, which is what context-extension methods are tuned for (e.g. a RoPE scaling
factor of target_length / training length, as in the papers).
"""

from collections.abc import Callable
import copy
import os

from longjax import configuration
from longjax.eval import duo, harness, plots
from longjax.models import registry
from longjax.training import state as state_lib

Overrides = dict[str, object]

def _rope_scaling(method: str) -> Callable[..., Overrides]:
  """A RoPE scaling tuned for the longest evaluation length: factor = target / train length."""

  def overrides(config, target_length: int) -> Overrides:
    return {"model.posenc.scaling": method,
            "model.posenc.factor": max(target_length / config.data.seq_len, 1.0),
            "model.posenc.original_length": config.data.seq_len}

  return overrides


# The paper's power for contexts beyond the training length (it reports p = 3 best at 1x).
REWEIGHT_POWER = 15.0


def _reweight(config) -> Overrides:
  """Re-weighting (Gao & Spratling, arXiv 2501.13428) sharpens softplus attention only."""
  if config.model.attention.normalizer != "softplus":
    raise configuration.ConfigError(
        "model.attention.normalizer", config.model.attention.normalizer,
        "--compare=reweight re-weights softplus attention; train with it first", ["softplus"])
  return {"model.attention.reweight_power": REWEIGHT_POWER}


def _retrieval(policy: str, config) -> Overrides:
  """A retrieval policy whose attended tokens fit in the training length L: a window of L/2,
  L/16 sinks and L/4 selected tokens (whole blocks of L/16 for InfLLM and HiP); far keys sit
  at L/2."""
  length = config.data.seq_len
  block = max(length // 16, 1)
  return {"model.attention.retrieval": policy, "model.attention.retrieval_window": length // 2,
          "model.attention.retrieval_block": block, "model.attention.retrieval_sinks": block,
          "model.attention.retrieval_top_k": 4 * block,
          "model.attention.retrieval_representatives": min(4, block)}


EVAL_METHODS: dict[str, Callable[..., Overrides]] = {
    "none": lambda config, target_length: {},
    # Logits scaled by log_{L_train}(position + 1) beyond the training length.
    "log_n": lambda config, target_length: {
        "model.attention.log_scaling_length": config.data.seq_len},
    "pi": _rope_scaling("linear"),
    "abf": _rope_scaling("abf"),
    "ntk": _rope_scaling("ntk"),
    "dynamic_ntk": lambda config, target_length: {
        "model.posenc.scaling": "dynamic_ntk", "model.posenc.factor": 1.0,
        "model.posenc.original_length": config.data.seq_len},
    "yarn": _rope_scaling("yarn"),
    "llama3": _rope_scaling("llama3"),
    # Sliding-window attention over the training length: no query sees an unseen distance.
    "window": lambda config, target_length: {"model.attention.window": config.data.seq_len},
    # The Λ-shaped mask of LM-Infinite / StreamingLLM without their position handling: 4 global
    # tokens plus a window of the training length.
    "lambda_mask": lambda config, target_length: {"model.attention.window": config.data.seq_len,
                                                  "model.attention.sink_tokens": 4},
    # LM-Infinite: the Λ mask with far global keys at the training distance.
    "lm_infinite": lambda config, target_length: {
        "model.attention.window": config.data.seq_len, "model.attention.sink_tokens": 4,
        "model.attention.distance_ceiling": config.data.seq_len},
    # Re-weighting (LSSAR) of a model trained with softplus attention, training-free.
    "reweight": lambda config, target_length: _reweight(config),
    # Retrieval from the whole cache (`longjax.layers.retrieval`), within a training length.
    "infllm": lambda config, target_length: _retrieval("infllm", config),
    "tokenselect": lambda config, target_length: _retrieval("tokenselect", config),
    "hip": lambda config, target_length: _retrieval("hip", config),
    # Half the KV heads keep the cache (chosen by calibration, `longjax.eval.duo`), the others
    # sinks and window.
    "duo": lambda config, target_length: _retrieval("duo", config),
}


def method_overrides(name: str, config, target_length: int) -> Overrides:
  if name not in EVAL_METHODS:
    raise configuration.ConfigError("--compare", name, "unknown evaluation method",
                                    sorted(EVAL_METHODS))
  overrides = EVAL_METHODS[name](config, target_length)
  # Every method changes softmax attention layers or the encoding they apply: on a model
  # without one (e.g. mixers="retnet") it would silently measure the unchanged model.
  if overrides and not any(entry.spec is registry.MIXERS["attention"]
                           for entry in registry.parse_mixers(config.model.mixers, config.model)):
    raise configuration.ConfigError(
        "--compare", name, "changes softmax attention layers (their window, scaling or position "
        f"encoding), but model.mixers={config.model.mixers!r} has none", ["none"])
  return overrides


def apply_overrides(config, overrides: Overrides):
  """A copy of `config` with dotted-name fields replaced (types checked by ml_collections)."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.update_from_flattened_dict(dict(overrides))
  return config


def compare(*, config, params, corpus, workdir: str, methods: list[str],
            progress: bool = True) -> dict[str, dict]:
  """Evaluates `params` under each method and overlays the loss-vs-length curves.

  Args:
    config: the run's config (with any other evaluation-time overrides).
    params: the trained parameters (their shapes do not depend on the methods).
    corpus: the run's corpus.
    workdir: the run directory; writes eval/perplexity-<method>.json, eval/compare.json and
      plots/compare_loss_vs_length.png, plots/compare_loss_vs_position.png.
    methods: names from `EVAL_METHODS`.

  Returns:
    {method: perplexity result, with the applied "overrides"}.
  """
  lengths = configuration.parse_eval_lengths(config.eval.lengths, config.data.seq_len)
  planned = {m: method_overrides(m, config, max(lengths)) for m in methods}  # fail early
  results = {}
  for method, overrides in planned.items():
    method_config = apply_overrides(config, overrides)
    configuration.validate_model(method_config.model)
    calibrated = duo.calibrate(method_config, params, corpus, workdir)
    if calibrated is not method_config:  # DuoAttention's head split, chosen now: recorded too
      method_config = calibrated
      overrides = {**overrides, "model.attention.retrieval_head_split":
                   calibrated.model.attention.retrieval_head_split}
    graphdef, _ = state_lib.model_graphdef(method_config.model, corpus.tokenizer.vocab_size)
    ctx = harness.EvalContext(config=method_config, graphdef=graphdef, params=params,
                              corpus=corpus, workdir=workdir, label=method, progress=progress)
    result = harness.perplexity_task(ctx)
    result["overrides"] = {k: v for k, v in overrides.items()}
    harness.write_json(os.path.join(workdir, "eval", f"perplexity-{method}.json"), result)
    results[method] = result
  harness.write_json(os.path.join(workdir, "eval", "compare.json"), {
      m: {k: r[k] for k in ("lengths", "loss", "bits_per_byte", "overrides")}
      for m, r in results.items()})
  first = next(iter(results.values()))
  plot_dir = os.path.join(workdir, "plots")
  plots.loss_vs_length(results, first["train_length"],
                       os.path.join(plot_dir, "compare_loss_vs_length.png"),
                       baseline=first["unigram_loss"])
  plots.loss_vs_position(results, first["train_length"],
                         os.path.join(plot_dir, "compare_loss_vs_position.png"))
  return results


def describe(results: dict[str, dict]) -> str:
  """A terminal table: one row per length, one column per method."""
  methods = list(results)
  lengths = results[methods[0]]["lengths"]
  width = max(10, *(len(m) + 2 for m in methods))
  lines = [f"{'length':>8}" + "".join(f"{m:>{width}}" for m in methods)]
  for i, length in enumerate(lengths):
    lines.append(f"{length:>8}" + "".join(f"{results[m]['loss'][i]:>{width}.4f}"
                                          for m in methods))
  return "\n".join(lines)
