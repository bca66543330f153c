"""T5's relative-position buckets (Raffel et al. 2020, Sec. 2.1) as a host-side table.

One implementation for the whole project: the flash kernel cuts it into runs of equal buckets,
and `longjax.posenc.relative_bias` looks positions up in it (this package is the leaf both can
import).
"""

import functools
import math

import numpy as np


def _log_bucket(n: int, num_buckets: int, max_distance: int) -> int:
  """The paper's bucket of a distance n >= 0 among `num_buckets` (one direction).

  Half the buckets hold the distances 0 .. num_buckets/2 - 1 exactly; the other half split
  [num_buckets/2, max_distance) into logarithmically growing ranges; anything farther shares the
  last bucket.
  """
  exact = num_buckets // 2
  if n < exact:
    return n
  wide = exact + int(math.log(n / exact) / math.log(max_distance / exact) * (num_buckets - exact))
  return min(wide, num_buckets - 1)


@functools.lru_cache(maxsize=None)
def t5_bucket_table(num_buckets: int, max_distance: int, bidirectional: bool) -> np.ndarray:
  """Bucket of every query-minus-key distance d = i - j in [-max_distance, max_distance].

  The log formula is evaluated once per configuration in float64 on the host, so every bucket
  boundary is exactly the paper's (a float32 log on the device can round a boundary distance
  into the neighbouring bucket); distances beyond +-max_distance have the bucket of the end.

  Args:
    num_buckets: buckets in all; bidirectional tables give half to keys after the query.
    max_distance: distances at or beyond it share the last bucket (of their direction).
    bidirectional: False (causal): keys after the query (d < 0) fall into bucket 0, where the
      causal mask hides them anyway.

  Returns:
    int32 [2 * max_distance + 1]; entry d + max_distance is the bucket of d.

  Raises:
    ValueError: num_buckets < 2 (bidirectional: odd or < 4), or max_distance not beyond the
      exact buckets.
  """
  exact = num_buckets // (4 if bidirectional else 2)
  if (num_buckets < (4 if bidirectional else 2) or num_buckets % (2 if bidirectional else 1)
      or max_distance <= exact):
    raise ValueError(f"T5 buckets need num_buckets >= 2 (bidirectional: even, >= 4) and "
                     f"max_distance > {exact}, got num_buckets={num_buckets}, "
                     f"max_distance={max_distance}, bidirectional={bidirectional}")
  if bidirectional:
    half = num_buckets // 2
    buckets = [(half if d < 0 else 0) + _log_bucket(abs(d), half, max_distance)
               for d in range(-max_distance, max_distance + 1)]
  else:
    buckets = [_log_bucket(max(d, 0), num_buckets, max_distance)
               for d in range(-max_distance, max_distance + 1)]
  return np.asarray(buckets, np.int32)
