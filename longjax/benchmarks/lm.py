"""One decoder LM, built twice: longjax's `DecoderLM` and the identical HF `LlamaForCausalLM`.

The train and decode suites compare the two on the same shapes. Both are pre-norm decoders with
RoPE (theta 10^4, all features rotated, HF's half-split rotation as ours), RMSNorm (eps 1e-6,
float32 statistics), SwiGLU MLPs, bias-free projections, untied input embedding and output head,
no dropout: the same parameters, one for one (`tests/benchmarks` asserts the counts are equal).

Shapes follow the issue's "where we start" configuration: vocabulary 259 (our byte tokenizer),
head dimension 64, MLP hidden width 8/3 of the model width rounded to a multiple of 64.
"""

import dataclasses

VOCAB = 259
HEAD_DIM = 64


@dataclasses.dataclass(frozen=True)
class LMShape:
  """A decoder LM and the batch it is measured on."""
  width: int
  layers: int
  t: int          # sequence length (train), or context length (decode)
  batch: int
  vocab: int = VOCAB

  @property
  def heads(self) -> int:
    return self.width // HEAD_DIM

  @property
  def mlp_hidden(self) -> int:
    return max(64, round(8 * self.width / 3 / 64) * 64)

  def name(self) -> str:
    return f"d{self.width} L{self.layers} T{self.t} B{self.batch}"

  def as_dict(self) -> dict:
    return {"width": self.width, "layers": self.layers, "t": self.t, "batch": self.batch,
            "heads": self.heads, "mlp_hidden": self.mlp_hidden, "vocab": self.vocab}


def matmul_params(shape: LMShape) -> int:
  """Parameters that take part in a matmul per token: every layer's projections and the head.

  The embedding table is a lookup (no FLOPs) and the norm scales are elementwise, so neither
  counts towards the 6 * params * tokens of a train step's matmul FLOPs.
  """
  d, f, n = shape.width, shape.mlp_hidden, shape.heads * HEAD_DIM
  per_layer = d * n + 2 * d * n + n * d + 3 * d * f  # q; k and v (MHA); out; gate, up, down
  return shape.layers * per_layer + d * shape.vocab


def total_params(shape: LMShape) -> int:
  """Every parameter: `matmul_params`, the embedding table and the norm scales (2 per layer and
  the final one)."""
  return matmul_params(shape) + shape.vocab * shape.width + (2 * shape.layers + 1) * shape.width


def longjax_config(shape: LMShape, *, dtype: str = "float32", remat: str = "none",
                   impl: str = "auto", model_overrides: dict | None = None):
  """The full longjax config (model and train sections) of `shape`; `model_overrides` sets
  dotted fields of `model` last (e.g. {"mixers": "retnet", "retnet.impl": "recurrent"})."""
  from longjax import defaults  # pylint: disable=g-import-not-at-top
  c = defaults.default_config()
  c.data.seq_len = shape.t
  m = c.model
  m.width, m.num_layers, m.num_heads = shape.width, shape.layers, shape.heads
  m.head_dim, m.mlp_hidden = HEAD_DIM, shape.mlp_hidden
  m.tie_embeddings, m.dtype, m.remat = False, dtype, remat
  # At these depths unrolled layers compile in seconds and run 3-5% faster in 15-20% less
  # memory than the scan (longjax/models/lm.py); HF's model is a Python loop over its layers.
  # Rematerialisation needs the scan (longjax/configuration.py).
  m.scan_layers = remat != "none"
  m.posenc.kind, m.posenc.rope_theta = "rope", 10_000.0
  m.posenc.max_length = max(m.posenc.max_length, shape.t)
  m.attention.impl = impl
  if model_overrides:
    m.update_from_flattened_dict(dict(model_overrides))
  return c


def build_longjax(shape: LMShape, **config_kwargs):
  """(graphdef, params as a pure dict, config) of the longjax model, initialised with seed 0."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from longjax.models import build_model  # pylint: disable=g-import-not-at-top
  cfg = longjax_config(shape, **config_kwargs)
  model = build_model(cfg.model, vocab_size=shape.vocab, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  return graphdef, state.to_pure_dict(), cfg


def count(params) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return sum(x.size for x in jax.tree.leaves(params))


def build_hf_llama(shape: LMShape, *, attn_implementation: str = "sdpa"):
  """The HF transformers `LlamaForCausalLM` with `shape`'s configuration (float32, seed 0).

  Raises:
    processes.Skip: torch or transformers is not installed (the `bench` extra).
  """
  from longjax.benchmarks import peers  # pylint: disable=g-import-not-at-top
  _, transformers = peers.import_transformers()
  config = transformers.LlamaConfig(
      vocab_size=shape.vocab, hidden_size=shape.width, intermediate_size=shape.mlp_hidden,
      num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
      num_key_value_heads=shape.heads, head_dim=HEAD_DIM, hidden_act="silu",
      max_position_embeddings=shape.t, rms_norm_eps=1e-6, rope_theta=10_000.0,
      tie_word_embeddings=False, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
      use_cache=False)
  config._attn_implementation = attn_implementation  # pylint: disable=protected-access
  return transformers.LlamaForCausalLM(config)


def copy_to_hf(params, model) -> None:
  """Copies longjax parameters (`build_longjax`'s pure dict) into an HF `LlamaForCausalLM`.

  With the same weights the two models compute the same function (`tests/benchmarks` checks the
  logits), which is what makes the timing comparison like for like. HF linear weights are
  [out, in]; ours are [in, ..., out] with heads as their own axis, and a stacked leading axis
  over layers (one group per layer: the pattern is a single attention block).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  torch = __import__("torch")
  group = params["groups"][0]

  def put(tensor, array):
    with torch.no_grad():
      tensor.copy_(torch.from_numpy(np.asarray(array, np.float32).copy()))

  put(model.model.embed_tokens.weight, params["embed"])
  put(model.model.norm.weight, params["final_norm"]["scale"])
  put(model.lm_head.weight, np.asarray(params["head"]).T)
  for i, layer in enumerate(model.model.layers):
    mixer, mlp = group["mixer"], group["mlp"]
    w_q = np.asarray(mixer["w_q"][i])                         # [D, N, H]
    w_kv = np.asarray(mixer["w_kv"][i])                       # [D, 2, K, H]
    w_out = np.asarray(mixer["w_out"][i])                     # [N, H, D]
    d = w_q.shape[0]
    put(layer.self_attn.q_proj.weight, w_q.reshape(d, -1).T)
    put(layer.self_attn.k_proj.weight, w_kv[:, 0].reshape(d, -1).T)
    put(layer.self_attn.v_proj.weight, w_kv[:, 1].reshape(d, -1).T)
    put(layer.self_attn.o_proj.weight, w_out.reshape(-1, d).T)
    w_in = np.asarray(mlp["w_in"][i])                         # [D, 2, F]: gate, up
    put(layer.mlp.gate_proj.weight, w_in[:, 0].T)
    put(layer.mlp.up_proj.weight, w_in[:, 1].T)
    put(layer.mlp.down_proj.weight, np.asarray(mlp["w_out"][i]).T)  # [F, D] -> [D, F]
    put(layer.input_layernorm.weight, group["mixer_norm"]["scale"][i])
    put(layer.post_attention_layernorm.weight, group["mlp_norm"]["scale"][i])


def run_cases(module: str, function: str, cfg: dict, impls, *, peer: str,
              memory_budget: int | None, timeout_s: float | None,
              jax_modules: tuple[str, ...]) -> list[dict]:
  """Runs `module.function` for every shape of a size set (`cfg["shapes"]`) and impl.

  Each case gets impl, the shape's width/layers/t/batch, the size set's repeats and budget_s,
  and `memory_budget`; the `peer` impl runs as a PyTorch case (skipped, with the reason, when
  torch or transformers is missing).
  """
  from longjax.benchmarks import suites  # pylint: disable=g-import-not-at-top
  cases = []
  for shape in cfg["shapes"]:
    for impl in impls:
      size = {"width": shape.width, "layers": shape.layers, "t": shape.t, "batch": shape.batch}
      cases.append({"function": function, "labels": {"impl": impl, **size},
                    "kwargs": {"impl": impl, **size, "repeats": cfg["repeats"],
                               "budget_s": cfg["budget_s"], "memory_budget": memory_budget},
                    "torch": impl == peer})
  return suites.run_cases(module, cases, desc=module.rsplit(".", 1)[-1],
                          timeout_s=cfg["timeout_s"] if timeout_s is None else timeout_s,
                          jax_modules=jax_modules, torch_needs=("torch", "transformers"))
