"""Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) (no MLP when its width is
0: the mixer-only layers of Mamba's and S4's language models)."""

from flax import nnx
import jax
import jax.numpy as jnp

from longjax.layers.mlp import SwiGLU
from longjax.layers.norms import RMSNorm


class Block(nnx.Module):
  """One layer. The residual stream stays float32 whatever the compute dtype, so that many
  bfloat16 sub-layer outputs do not accumulate rounding error in it."""

  def __init__(self, mixer: nnx.Module, width: int, mlp_hidden: int, *, out_init_scale: float,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.mixer_norm = RMSNorm(width, dtype=dtype, rngs=rngs)
    self.mixer = mixer
    if mlp_hidden:
      self.mlp_norm = RMSNorm(width, dtype=dtype, rngs=rngs)
      self.mlp = SwiGLU(width, mlp_hidden, out_init_scale=out_init_scale, dtype=dtype, rngs=rngs)
    else:
      self.mlp_norm = self.mlp = None

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids: jax.Array | None = None,
               cache=None):
    """x [B, T, D] float32 -> ([B, T, D] float32, new mixer cache)."""
    h, cache = self.mixer(self.mixer_norm(x), positions=positions, segment_ids=segment_ids,
                          cache=cache)
    x = x + h.astype(x.dtype)
    if self.mlp is not None:
      x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
    return x, cache
