"""S4 in the gated H3-style block: the mixer `s4`.

The block is `s4d`'s (q * SSM(shift(k) * v), `longjax.layers.s4d`); the SSM is S4's (Gu, Goel &
Ré 2022): per channel the diagonal-plus-low-rank state matrix A = diag(Lambda) - P P^* in the
eigenbasis of HiPPO-LegS's normal part (initialised from its NPLR form, `longjax.ops.s4_kernel`),
discretised by the bilinear transform. Training runs the convolution with the kernel from the
Cauchy kernel and the Woodbury correction (O(N L), one FFT); decoding, prompts continued from a
cache and packed batches run the recurrence with the dense [N/2, N/2] discrete matrix. The
decode state is an `SSMState` of E * N/2 complex values, constant in the length.

Config: `model.s4` (`defaults` below); `--config.model.mixers=s4`.
"""

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from longjax.layers import caches
from longjax.layers import dims
from longjax.layers import params
from longjax.layers import s4d
from longjax.layers.mixer import MixerSpec
from longjax.ops import s4_kernel as ops


def _pairs(values):
  """An init returning complex `values` [M] broadcast to [E, M] as real pairs [E, M, 2]."""
  pairs = jnp.stack([jnp.real(values), jnp.imag(values)], axis=-1).astype(jnp.float32)
  return lambda k, s, d: jnp.broadcast_to(pairs, s).astype(d)


class S4(s4d.S4D):
  """H3's gated block around an S4 (DPLR) layer."""

  def _init_ssm(self, width: int, state_dim: int, init: str, rngs: nnx.Rngs) -> None:
    del init  # HiPPO-LegS
    half = state_dim // 2
    lam, p, b, _ = ops.nplr_legs(state_dim)
    self.a_real_log = params.param(
        rngs, lambda k, s, d: jnp.broadcast_to(jnp.log(-lam.real).astype(d), s),
        (width, half), (params.MLP, None))
    self.a_imag = params.param(rngs, lambda k, s, d: jnp.broadcast_to(lam.imag.astype(d), s),
                               (width, half), (params.MLP, None))
    self.p = params.param(rngs, _pairs(p), (width, half, 2), (params.MLP, None, None))
    self.b = params.param(rngs, _pairs(b), (width, half, 2), (params.MLP, None, None))

  def _run_ssm(self, u, segment_ids, initial_state):
    dt, lam, b, c = self.ssm_parameters()
    p = jax.lax.complex(self.p.value[..., 0], self.p.value[..., 1])
    return ops.dplr_ssm(u, lam, p, b, c, dt, self.d_skip.value, segment_ids=segment_ids,
                        initial_state=initial_state, impl=self.impl)


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.state_dim = 64            # N real states per channel (N/2 complex), HiPPO-LegS of size N
  c.shift_size = 4            # K taps of H3's shift filter on the keys
  c.dt_min = 0.001            # dt is log-uniform in [dt_min, dt_max] at init
  c.dt_max = 0.1
  c.impl = "auto"             # auto | fft | recurrent
  return c


def validate(model, c, prefix: str = "model.s4") -> None:
  """Raises ConfigError for the first bad field of the section `c` of `model`."""
  del model
  s4d.validate_h3(c, prefix, ops.IMPLS)


def build(model, c, rngs) -> S4:
  return S4(model.width, state_dim=c.state_dim, discretization="bilinear",
            shift_size=c.shift_size, dt_min=c.dt_min, dt_max=c.dt_max, impl=c.impl,
            out_init_scale=dims.out_init_scale(model), dtype=dims.DTYPES[model.dtype], rngs=rngs)


SPEC = MixerSpec(name="s4", section="s4", defaults=defaults, validate=validate, build=build,
                 cache_types=(caches.SSMState,))
