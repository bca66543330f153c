"""FLOP counts for the benchmarks' utilisation columns (one multiply-add = 2 FLOPs).

Only the matrix products are counted (softmax, masking, exponentials and the recurrences'
elementwise work are not): this is the convention of the FlashAttention papers and of MFU, so the
achieved GFLOP/s can be set against the measured matmul peak.
"""


def matmul_flops(m: int, k: int, n: int) -> int:
  """FLOPs of an [m, k] x [k, n] product: m * n * k multiply-adds."""
  return 2 * m * k * n


def visible_pairs(t: int, s: int, causal: bool) -> int:
  """Query/key pairs (i, j) that a mask lets through, per batch element and head.

  Causal attention of T queries to S keys is bottom-right aligned, as with a KV cache: query row
  i sits at absolute position i + (S - T) and sees keys j <= i + (S - T). For T = S that is
  T (T + 1) / 2 pairs, the exact count; the FlashAttention benchmarks use T^2 / 2, which differs
  by the factor 1 + 1/T (0.1% at T = 1k).

  Args:
    t: T, query length.
    s: S, key length.
    causal: count only the pairs the causal mask keeps.

  Returns:
    The number of visible pairs.
  """
  if not causal:
    return t * s
  offset = s - t
  # Row i sees min(S, max(0, i + offset + 1)) keys: none before row `first`, a growing
  # arithmetic series up to row `full`, all S keys after it.
  first = min(t, max(0, -offset))
  full = min(t, max(first, s - offset - 1))
  n = full - first
  lo = first + offset + 1
  return n * (2 * lo + n - 1) // 2 + (t - full) * s


def attention_flops(t: int, s: int, heads: int, head_dim: int, causal: bool, backward: bool,
                    batch: int = 1) -> int:
  """FLOPs of softmax attention, causal pairs counted once.

  Forward: two matmuls per head, logits = q k^T ([T, H] x [H, S]) and out = p v ([T, S] x [S, H]),
  each H multiply-adds per visible (query, key) pair, so 2 * 2 * B * N * pairs * H FLOPs, which
  is 4 * B * N * T * S * H without a mask and about half of it with a causal one.

  Backward: the FlashAttention count, five matmuls per head against the forward's two, i.e.
  2.5x the forward: recomputing q k^T, dv = p^T do, dp = do v^T, dq = ds k and dk = ds^T q. So
  forward + backward = 3.5x the forward (FlashAttention's `flops(..., mode="fwd_bwd")`).

  Args:
    t: T, query length.
    s: S, key length.
    heads: N, query heads.
    head_dim: H.
    causal: count only the visible pairs of a causal mask (see `visible_pairs`).
    backward: count forward + backward (3.5x forward) instead of forward only.
    batch: B.

  Returns:
    FLOPs as an int.
  """
  matmuls = 2 + (5 if backward else 0)
  return 2 * matmuls * batch * heads * head_dim * visible_pairs(t, s, causal)


def lm_train_flops(*, matmul_params: int, layers: int, heads: int, head_dim: int, t: int,
                   batch: int) -> int:
  """Model FLOPs of one decoder-LM train step (forward + backward), for MFU.

  6 * matmul parameters * tokens (2 per multiply-add forward, twice that backward: the gradients
  of the activations and of the weights), plus causal attention's two matmuls per head, counted
  for the visible pairs only, three times (forward, and the two backward products of each).
  Rematerialisation is not counted: MFU is about the model's FLOPs, not the program's.

  Args:
    matmul_params: parameters used in a matmul per token (projections, MLP, output head).
    layers, heads, head_dim: the attention layers' shape.
    t: sequence length T.
    batch: B.

  Returns:
    FLOPs as an int.
  """
  dense = 6 * matmul_params * batch * t
  attention = 3 * layers * attention_flops(t, t, heads, head_dim, causal=True, backward=False,
                                           batch=batch)
  return dense + attention


def window_pairs(t: int, window: int) -> int:
  """Query/key pairs of causal attention over the last `window` tokens (itself included)."""
  w = min(window, t)
  return w * (w + 1) // 2 + (t - w) * w


def chunked_linear_attention_flops(t: int, heads: int, key_dim: int, value_dim: int, chunk: int,
                                   backward: bool, batch: int = 1) -> int:
  """FLOPs of the chunked (Lightning Attention-2) form of causal linear attention.

  Per head, within each chunk the two masked products q k^T and (q k^T) v over the causal pairs
  of the chunk (Dk and Dv multiply-adds per pair), and per token the two state products q S and
  k^T v (Dk Dv multiply-adds each). The backward pass has twice the forward's products (the
  gradients of both operands of each), so forward + backward = 3x the forward. A per-channel
  decay (GLA) makes the within-chunk scores an elementwise [C, C, Dk] product instead of a
  matmul; it is counted the same (the same multiply-adds).

  Args:
    t: T; heads: N; key_dim: Dk (the feature size); value_dim: Dv (with the normaliser's
    column when normalised); chunk: C; backward: forward + backward; batch: B.
  """
  full, rest = divmod(t, chunk)
  pairs = full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2
  forward = 2 * batch * heads * (pairs * (key_dim + value_dim) + 2 * t * key_dim * value_dim)
  return 3 * forward if backward else forward
