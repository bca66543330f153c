"""What the linear-attention mixers share: the recurrent-state cache, the call of
`longjax.ops.linear_attention` that continues it, the output projection and the normalisation
without a gain their papers put on the attention output. A mixer subclasses `RecurrentMixer`
and keeps only its projections, feature maps, decays and gates."""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from longjax.layers import caches
from longjax.ops import linear_attention as ops

_NORM_EPS = 1e-6


def rms_normalize(x: jax.Array, axis=-1) -> jax.Array:
  """x / RMS(x) over `axis`, in float32, without a gain (RetNet's group norm, SRMSNorm)."""
  x32 = x.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + _NORM_EPS)


class RecurrentMixer(nnx.Module):
  """Base of the mixers whose cache is a `RecurrentState`.

  A subclass sets `num_heads`, `key_dim` and `value_dim` (the state is [N, Dk, Dv]),
  `normalize`, `impl`, `chunk_size`, `dtype` and the output projection `w_out` [N, Dv, D].
  """

  def init_cache(self, batch_size: int, max_length: int, dtype=None) -> caches.RecurrentState:
    """The [B, N, Dk, Dv (+1 normalised)] state, whatever `max_length`."""
    del max_length, dtype  # the state is float32 and constant in the length
    return caches.RecurrentState.empty(ops.state_shape(batch_size, self.num_heads, self.key_dim,
                                                       self.value_dim, self.normalize))

  def _attend(self, q, k, v, *, segment_ids, cache, log_decay=None, scale: float = 1.0):
    """`ops.linear_attention` from the cache's state (or zeros): (out [B, T, N, Dv], cache)."""
    caches.refuse_segments_with_cache(cache, segment_ids)
    out, state = ops.linear_attention(
        q, k, v, log_decay=log_decay, segment_ids=segment_ids,
        initial_state=None if cache is None else cache.state, normalize=self.normalize,
        scale=scale, impl=self.impl, chunk_size=self.chunk_size)
    if cache is not None:
      cache = dataclasses.replace(cache, state=state, end=cache.end + q.shape[1])
    return out, cache

  def _project_out(self, y: jax.Array) -> jax.Array:
    """[B, T, N, Dv] -> [B, T, D] in the compute dtype."""
    return jnp.einsum("btnh,nhd->btd", y.astype(self.dtype), self.w_out.value.astype(self.dtype))
