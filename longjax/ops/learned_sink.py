"""A learned attention sink: one extra key/value pair that every query sees.

StreamingLLM (Xiao et al. 2024, "Efficient Streaming Language Models with Attention Sinks",
Sec. 3.3) pre-trains with a learnable placeholder token at the start of every sample, so that
the model dumps its surplus attention there instead of on whatever tokens happen to come first.
That token sits at position 0 and attends only to itself, so at every layer its key and value
are constants of the parameters: learning them directly per layer and KV head (`k_sink`,
`v_sink` [K, H]) is the same model class, needs no extra token in the data, cache or masks, and
is visible to every query of every packed document. The sink key is not rotated and gets no
positional bias (it has no position of its own), as in the learned sink logits of later models.

The sink enters as one more term of each softmax row; given the row's log-sum-exp over the real
keys, out' = (e^lse out + e^s v_sink) / (e^lse + e^s) with s the sink logit: the log-sum-exp
merge (`kernels_pallas.softmax.merge_attention`) of the keys' part and the sink's.
"""

import jax
import jax.numpy as jnp

from kernels_pallas import softmax


def add_learned_sink(out: jax.Array, lse: jax.Array, q: jax.Array, k_sink: jax.Array,
                     v_sink: jax.Array, *, scale: float | None = None) -> jax.Array:
  """Merges a learned sink into attention that was normalised over the real keys only.

  Args:
    out: [B, T, N, H] attention output over the real keys.
    lse: [B, N, T] float32 log-sum-exp of those logits (-inf for a row that saw no key).
    q: [B, T, N, H] the queries as they entered the attention (rotated, scaled).
    k_sink, v_sink: [K, H] per KV head; query head n uses KV head n // (N // K).
    scale: logit scale; None = H^-0.5, as in `dot_product_attention`.

  Returns:
    [B, T, N, H] in out.dtype.
  """
  num_heads, head_dim = q.shape[2], q.shape[3]
  group = num_heads // k_sink.shape[0]
  scale = head_dim**-0.5 if scale is None else scale
  k_heads = jnp.repeat(k_sink.astype(jnp.float32), group, axis=0)  # [N, H], tiny
  v_heads = jnp.repeat(v_sink.astype(jnp.float32), group, axis=0)
  sink_logit = jnp.einsum("btnh,nh->bnt", q.astype(jnp.float32), k_heads) * scale
  # The sink is one more part of the softmax: its one key's output is v_sink, its lse the logit.
  sink_out = jnp.broadcast_to(v_heads, out.shape)
  merged, _ = softmax.merge_attention([(out, lse), (sink_out, sink_logit)])
  return merged.astype(out.dtype)
