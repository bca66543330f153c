"""Short causal depthwise convolution over time, with document resets and a decode history: the
local token mixing of Based's gated convolutions and of Mamba's input branch.

  y_t = sum_{i=0..K-1} w_i x_{t-K+1+i}      (per channel; w_{K-1} weighs the current token)

the layout of a PyTorch `Conv1d(groups=C, padding=K-1)` truncated to the first T outputs, so
checkpoints convert without flipping. Inputs before the sequence come from `history` (a decode
cache's last K-1 inputs) or are zero. In a packed batch an input from another document counts as
zero: no document sees its neighbour's tail.
"""

import jax
import jax.numpy as jnp


def history_shape(batch_size: int, kernel_size: int, channels: int) -> tuple[int, int, int]:
  """The decode history [B, K-1, C]: the last K-1 inputs, constant in the length."""
  return (batch_size, kernel_size - 1, channels)


def causal_conv(x: jax.Array, kernel: jax.Array, *, segment_ids: jax.Array | None = None,
                history: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Depthwise causal convolution.

  Args:
    x: [B, T, C] inputs.
    kernel: [K, C] weights; kernel[K-1] multiplies the current input.
    segment_ids: [B, T] document ids of a packed batch (None: one document per row).
    history: [B, K-1, C] the inputs before x (a decode cache's); None = zeros.

  Returns:
    (y [B, T, C] in x's dtype, new history [B, K-1, C]: the last K-1 inputs of history + x).
  """
  b, t, c = x.shape
  k = kernel.shape[0]
  if kernel.shape != (k, c):
    raise ValueError(f"kernel must be [K, C={c}], got {kernel.shape}")
  if history is None:
    history = jnp.zeros(history_shape(b, k, c), x.dtype)
  elif history.shape != history_shape(b, k, c):
    raise ValueError(f"history must be {list(history_shape(b, k, c))}, got {history.shape}")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"segment_ids must be [B={b}, T={t}], got {segment_ids.shape}")
  padded = jnp.concatenate([history.astype(x.dtype), x], axis=1)  # [B, K-1+T, C]
  if segment_ids is not None:
    # The history (zeros in training) takes the first token's document.
    seg = jnp.concatenate([jnp.repeat(segment_ids[:, :1], k - 1, axis=1), segment_ids], axis=1)
  y = jnp.zeros((b, t, c), jnp.float32)
  for i in range(k):  # K is small (2..4): K shifted multiply-adds, no [T, K] patches
    term = padded[:, i:i + t].astype(jnp.float32) * kernel[i].astype(jnp.float32)
    if segment_ids is not None:
      term = jnp.where((seg[:, i:i + t] == segment_ids)[..., None], term, 0.0)
    y = y + term
  return y.astype(x.dtype), padded[:, t:]
