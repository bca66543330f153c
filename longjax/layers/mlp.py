"""SwiGLU feed-forward block (Shazeer 2020, "GLU Variants Improve Transformer")."""

from flax import nnx
import jax
import jax.numpy as jnp

from longjax.layers import params


class SwiGLU(nnx.Module):
  """y = (silu(x W_gate) * (x W_up)) W_down.

  Shapes: x [B, T, D] -> [B, T, D]; hidden width F.
  """

  def __init__(self, width: int, hidden: int, *, out_init_scale: float = 1.0, dtype=jnp.float32,
               rngs: nnx.Rngs):
    fan_in = params.fan_in_init(in_axis=0, out_axis=(1, 2))
    out_init = params.fan_in_init(out_init_scale, in_axis=0, out_axis=1)
    # Gate and up projections share one [D, 2, F] matrix: one matmul instead of two.
    self.w_in = params.param(rngs, fan_in, (width, 2, hidden), (params.EMBED, None, params.MLP))
    self.w_out = params.param(rngs, out_init, (hidden, width), (params.MLP, params.EMBED))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    gate_up = jnp.einsum("btd,dcf->btcf", x, self.w_in.value.astype(self.dtype))
    hidden = jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1]
    return jnp.einsum("btf,fd->btd", hidden, self.w_out.value.astype(self.dtype))
