"""Dimension legend and array aliases shared by every module.

Shapes in docstrings and einsum strings use these letters:

  B batch          T query length      S key length       D model width
  N query heads    K kv heads          G heads per kv head (N // K)
  H head dim       F mlp width         V vocabulary       P state size
  L layers         C chunk / block

Activations are [B, T, D]; attention heads [B, T, N, H]; KV caches [B, S, K, H].
"""

import jax

Array = jax.Array
