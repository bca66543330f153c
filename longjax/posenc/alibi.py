"""ALiBi slopes (Press et al. 2022, "Train Short, Test Long").

Each head adds -m_n * |i - j| to its logits. For a power-of-two head count N the slopes are the
geometric sequence 2^(-8/N), 2^(-16/N), ..., 2^(-8). For other N the paper takes the slopes of the
closest smaller power of two, P, and interleaves every other slope of 2P (Section 3 and the
reference implementation's `get_slopes`).
"""

import math

import numpy as np


def _power_of_two_slopes(n: int) -> list[float]:
  start = 2.0 ** (-8.0 / n)
  return [start ** (i + 1) for i in range(n)]


def alibi_slopes(num_heads: int) -> np.ndarray:
  """Per-head ALiBi slopes.

  Args:
    num_heads: N >= 1.

  Returns:
    [N] float32 slopes, largest first.
  """
  if num_heads < 1:
    raise ValueError(f"num_heads must be >= 1, got {num_heads}")
  closest = 2 ** int(math.floor(math.log2(num_heads)))
  slopes = _power_of_two_slopes(closest)
  if closest != num_heads:
    slopes += _power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
  return np.asarray(slopes, np.float32)
