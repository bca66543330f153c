"""RMSNorm (Zhang & Sennrich 2019): x / rms(x) * scale, statistics in float32."""

from flax import nnx
import jax
import jax.numpy as jnp

from longjax.layers import params


class RMSNorm(nnx.Module):
  """Root-mean-square normalisation over the last axis.

  The mean square is computed in float32 even for bfloat16 activations: a sum of D squares in
  bfloat16 loses most of its mantissa.
  """

  def __init__(self, width: int, *, eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
    self.scale = params.param(rngs, jax.nn.initializers.ones, (width,), (params.EMBED,))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., D] -> [..., D] in the compute dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale.value).astype(self.dtype)
