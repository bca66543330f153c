"""DuoAttention-style head split (Xiao et al. 2025, "DuoAttention: Efficient Long-Context LLM
Inference with Retrieval and Streaming Heads"): a calibration pass picks the KV heads that keep
the whole cache (retrieval heads); the others keep only sinks and the local window (streaming
heads, `longjax.layers.retrieval`).

DuoAttention learns a gate per head by distillation on synthetic passkey data. Training-free
here, the calibration runs the model over training documents with every head a retrieval head
and ranks the heads by the attention weight their queries give to keys before the window: a
head that never looks past the window loses nothing by streaming. The heads with the largest
weight, `retrieval_heads` of all KV heads across the model, become retrieval heads.
"""

import copy
import json
import logging
import os

import jax
import numpy as np

from longjax import configuration
from longjax.data import pipeline
from longjax.layers import retrieval_config
from longjax.training import state as state_lib

CALIBRATION_DOCS = 4


def head_weights(graphdef, params, tokens, group: int) -> dict[int, np.ndarray]:
  """Mean weight per query on keys before the window, per model layer and KV head.

  Args:
    graphdef, params: a model whose duo layers have no head split (every head a retrieval
      head).
    tokens: [B, T] calibration documents.
    group: query heads per KV head.

  Returns:
    {layer index: [K] mean over documents, positions and each KV head's query heads}.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top

  @jax.jit
  def prefill(params, tokens):
    model = nnx.merge(graphdef, params)
    return model(tokens, cache=model.init_cache(*tokens.shape))[1]

  weights = {}
  for layer, cache in enumerate(prefill(params, tokens)):
    if isinstance(getattr(cache, "policy", None), dict) and "distant_mass" in cache.policy:
      mass = np.asarray(cache.policy["distant_mass"]).sum(0)  # [K]: summed over rows
      weights[layer] = mass / (tokens.shape[0] * tokens.shape[1] * group)
  return weights


def choose_split(weights: dict[int, np.ndarray], fraction: float) -> dict[int, tuple[int, ...]]:
  """The `fraction` of all (layer, KV head) pairs with the largest weight (at least one)."""
  pairs = [(w, layer, head) for layer, ws in weights.items() for head, w in enumerate(ws)]
  keep = max(1, round(fraction * len(pairs)))
  chosen = sorted(pairs, reverse=True)[:keep]
  return {layer: tuple(sorted(h for _, l, h in chosen if l == layer)) for layer in weights}


def calibrate(config, params, corpus, workdir: str | None = None):
  """`config` with `model.attention.retrieval_head_split` chosen by calibration when the duo
  policy is on and no split is given; otherwise `config` itself. (The model's graphdef
  depends on the split: build it from the returned config.)

  The calibration documents come from the training set, at the longest evaluation length
  (where the split will be used). The split and the weights go to
  WORKDIR/eval/duo_heads.json.
  """
  attention = config.model.attention
  if attention.retrieval != "duo" or attention.retrieval_head_split:
    return config
  length = max(configuration.parse_eval_lengths(config.eval.lengths, config.data.seq_len))
  graphdef, _ = state_lib.model_graphdef(config.model, corpus.tokenizer.vocab_size)
  while True:  # the longest length that enough training documents reach
    try:
      docs = pipeline.eval_sequences(data_source=corpus.train, tokenizer=corpus.tokenizer,
                                     length=length, count=CALIBRATION_DOCS)
      break
    except ValueError:
      if length // 2 <= attention.retrieval_window:
        raise
      length //= 2
  model = config.model
  group = model.num_heads // (model.num_kv_heads or model.num_heads)
  weights = head_weights(graphdef, params, np.asarray(docs, np.int32), group)
  split = choose_split(weights, attention.retrieval_heads)
  text = retrieval_config.format_head_split(split)
  logging.info("duo calibration on %d x %d tokens: retrieval heads %s", *docs.shape, text)
  if workdir:
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", "duo_heads.json"), "w") as f:
      json.dump({"head_split": text, "fraction": attention.retrieval_heads,
                 "calibration_tokens": list(docs.shape),
                 "weights": {str(k): v.tolist() for k, v in weights.items()}}, f, indent=1)
  config = copy.deepcopy(config)
  with config.unlocked():
    config.model.attention.retrieval_head_split = text
  return config
