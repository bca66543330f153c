"""Logit biases written out in float64 numpy from the papers' formulas, for tests.

Independent of `longjax.posenc`: plain loops or broadcasting over explicit positions, no lookup
tables, no block slicing. Every function returns [B, N, T, S] float64 for query positions [B, T]
and key positions [B, S].
"""

import math

import numpy as np


def t5_bucket(d: int, num_buckets: int, max_distance: int, bidirectional: bool) -> int:
  """Bucket of query-minus-key distance d (Raffel et al. 2020; T5's relative_position is -d)."""
  offset = 0
  if bidirectional:
    num_buckets //= 2
    if d < 0:  # the key comes after the query: the second half of the buckets
      offset = num_buckets
    n = abs(d)
  else:
    n = max(d, 0)
  exact = num_buckets // 2
  if n < exact:
    return offset + n
  log_ratio = math.log(n / exact) / math.log(max_distance / exact)
  return offset + min(exact + int(log_ratio * (num_buckets - exact)), num_buckets - 1)


def _distance(q_pos, kv_pos):
  q_pos, kv_pos = np.asarray(q_pos, np.int64), np.asarray(kv_pos, np.int64)
  return q_pos[:, :, None] - kv_pos[:, None, :]  # [B, T, S]


def t5(table, q_pos, kv_pos, max_distance: int, bidirectional: bool) -> np.ndarray:
  table = np.asarray(table, np.float64)
  d = _distance(q_pos, kv_pos)
  buckets = np.vectorize(
      lambda x: t5_bucket(int(x), table.shape[0], max_distance, bidirectional))(d)
  return np.moveaxis(table[buckets], -1, 1)


def alibi(slopes, q_pos, kv_pos) -> np.ndarray:
  d = np.abs(_distance(q_pos, kv_pos)).astype(np.float64)
  return -np.asarray(slopes, np.float64)[None, :, None, None] * d[:, None]


def kerple(r1, r2, q_pos, kv_pos, kind: str) -> np.ndarray:
  d = np.abs(_distance(q_pos, kv_pos)).astype(np.float64)[:, None]
  r1 = np.asarray(r1, np.float64)[None, :, None, None]
  r2 = np.asarray(r2, np.float64)[None, :, None, None]
  if kind == "log":
    return -r1 * np.log(1.0 + r2 * d)
  return -r1 * d**r2


def fire(c, threshold, w1, b1, w2, b2, q_pos, kv_pos) -> np.ndarray:
  """f(psi(|i - j|) / psi(max(L, i))), psi(x) = log(c x + 1), f(x) = w2 . relu(w1 x + b1) + b2."""
  c, threshold = float(c), float(threshold)
  psi = lambda x: np.log(c * x + 1.0)
  d = np.abs(_distance(q_pos, kv_pos)).astype(np.float64)
  i = np.asarray(q_pos, np.float64)
  x = psi(d) / (psi(np.maximum(threshold, i))[:, :, None] + 1e-6)
  hidden = np.maximum(x[..., None] * np.asarray(w1, np.float64) + np.asarray(b1, np.float64), 0)
  out = hidden @ np.asarray(w2, np.float64) + np.asarray(b2, np.float64)  # [B, T, S, N]
  return np.moveaxis(out, -1, 1)
