"""RoPE scalings for context extension: inverse frequencies (and an attention factor) per method.

Every method is a pure function

    inv_freq, attention_factor = fn(head_dim, theta=..., factor=..., original_length=..., **hp)

returning the [R/2] float32 inverse frequencies to rotate R features with (R = `head_dim` here is
the *rotary* dim, which is smaller than the head dim under partial rotary) and the factor by
which queries and keys are both multiplied after rotation (so logits scale by its square; 1.0 for
methods without one). `factor` is the context-extension ratio s = L' / L (target length over the
training length `original_length`). Static methods depend only on their arguments, so a decode
cache of rotated keys stays valid; `dynamic_ntk` also takes the current context `length`, which
may be a traced value (it is computed with jnp and works under jit).

Notation below: d = R, theta_i = theta^(-2i/d) for i in [0, d/2), wavelength lambda_i = 2 pi /
theta_i, L = original_length, s = factor.
"""

from collections.abc import Callable
import math

import jax.numpy as jnp
import numpy as np

from longjax.typing import Array

ScalingFn = Callable[..., tuple[Array, float | Array]]


def _check(name: str, head_dim: int, theta: float, factor: float) -> None:
  if head_dim <= 0 or head_dim % 2:
    raise ValueError(f"{name}: the rotary dim must be positive and even, got {head_dim}")
  if theta <= 0:
    raise ValueError(f"{name}: theta must be positive, got {theta}")
  if factor <= 0:
    raise ValueError(f"{name}: factor must be positive, got {factor}")


def _need_original_length(name: str, original_length: int) -> None:
  if original_length <= 0:
    raise ValueError(f"{name}: original_length (the training length) must be positive, "
                     f"got {original_length}")


def _base_frequencies(head_dim: int, theta: float) -> np.ndarray:
  # float64 on the host: the constants are exact before the single cast to float32.
  return theta ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def _out(inv_freq: np.ndarray, attention_factor: float = 1.0) -> tuple[Array, float]:
  return jnp.asarray(inv_freq, jnp.float32), float(attention_factor)


def _ramp_blend(inv_freq: np.ndarray, factor: float, original_length: int, low: float,
                high: float) -> np.ndarray:
  """Per-frequency blend of interpolation (theta_i / s) and extrapolation (theta_i).

  r_i = L / lambda_i counts the turns frequency i makes over the training context. The weight of
  extrapolation is gamma(r) = clip((r - low) / (high - low), 0, 1): fast frequencies (r > high)
  keep their trained values, slow ones (r < low) are interpolated, the ones between are blended
  linearly in r. Shared by YaRN ("NTK-by-parts") and Llama-3.1, which differ only in (low, high)
  and in YaRN's attention factor.
  """
  turns = original_length * inv_freq / (2 * math.pi)
  gamma = np.clip((turns - low) / (high - low), 0.0, 1.0)
  return (1.0 - gamma) * inv_freq / factor + gamma * inv_freq


def plain(head_dim: int, *, theta: float = 10_000.0, factor: float = 1.0,
         original_length: int = 0) -> tuple[Array, float]:
  """Plain RoPE (Su et al. 2021): theta_i; `factor` and `original_length` are ignored.

  Returns:
    (inv_freq [head_dim/2] float32, 1.0).
  """
  del original_length
  _check("plain", head_dim, theta, factor)
  return _out(_base_frequencies(head_dim, theta))


def linear(head_dim: int, *, theta: float = 10_000.0, factor: float = 1.0,
           original_length: int = 0) -> tuple[Array, float]:
  """Position Interpolation (Chen et al. 2023): position p is rotated as p / s, i.e. theta_i / s.

  Returns:
    (inv_freq [head_dim/2] float32, 1.0).
  """
  del original_length
  _check("linear", head_dim, theta, factor)
  return _out(_base_frequencies(head_dim, theta) / factor)


def abf(head_dim: int, *, theta: float = 10_000.0, factor: float = 1.0, original_length: int = 0,
        base: float = 0.0) -> tuple[Array, float]:
  """Adjusted base frequency (Xiong et al. 2023, "Effective Long-Context Scaling"): a new base.

  The paper raises Llama 2's base from 10,000 to 500,000. Here the new base is `base` when given
  (> 0), else theta * s.

  Returns:
    (inv_freq [head_dim/2] float32, 1.0).
  """
  del original_length
  _check("abf", head_dim, theta, factor)
  if base < 0:
    raise ValueError(f"abf: base must be positive (or 0 = theta * factor), got {base}")
  return _out(_base_frequencies(head_dim, base or theta * factor))


def _ntk_base(name: str, head_dim: int, theta: float, factor):
  if head_dim <= 2:
    raise ValueError(f"{name}: needs a rotary dim > 2 (the exponent is d / (d - 2)), "
                     f"got {head_dim}")
  return theta * factor ** (head_dim / (head_dim - 2))


def ntk(head_dim: int, *, theta: float = 10_000.0, factor: float = 1.0,
        original_length: int = 0) -> tuple[Array, float]:
  """NTK-aware scaling (bloc97, 2023): base theta * s^(d / (d - 2)).

  The exponent makes the slowest frequency exactly theta_{d/2-1} / s (interpolated like PI) while
  the fastest stays theta_0 = 1 (extrapolated).

  Returns:
    (inv_freq [head_dim/2] float32, 1.0).
  """
  del original_length
  _check("ntk", head_dim, theta, factor)
  return _out(_base_frequencies(head_dim, _ntk_base("ntk", head_dim, theta, factor)))


def dynamic_ntk(head_dim: int, *, theta: float = 10_000.0, factor: float = 1.0,
                original_length: int = 0, length=None) -> tuple[Array, float]:
  """Dynamic NTK (emozilla, 2023; Hugging Face's "dynamic" rope_type): NTK for the current length.

  For a context of `length` = l tokens: plain RoPE while l <= L, else NTK-aware scaling with the
  effective factor s' = s * l / L - (s - 1) (= 1 at l = L, so the frequencies are continuous in
  l). Computed with jnp so that `length` may be traced (taken from the input under jit).

  Args:
    head_dim: the rotary dim d.
    theta: the base.
    factor: s.
    original_length: L, the training length.
    length: l, the current context length (int or traced int scalar); None = L.

  Returns:
    (inv_freq [head_dim/2] float32, 1.0).
  """
  _check("dynamic_ntk", head_dim, theta, factor)
  _need_original_length("dynamic_ntk", original_length)
  _ntk_base("dynamic_ntk", head_dim, theta, factor)  # rejects d <= 2
  if length is None:
    length = original_length
  ratio = jnp.maximum(jnp.asarray(length, jnp.float32), original_length) / original_length
  effective = factor * ratio - (factor - 1.0)
  base = theta * effective ** (head_dim / (head_dim - 2))
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / base**exponents, 1.0


def yarn(head_dim: int, *, theta: float = 10_000.0, factor: float = 1.0, original_length: int = 0,
         beta_fast: float = 32.0, beta_slow: float = 1.0) -> tuple[Array, float]:
  """YaRN (Peng et al. 2023): NTK-by-parts interpolation plus an attention temperature.

  h(theta_i) = (1 - gamma(r_i)) theta_i / s + gamma(r_i) theta_i with r_i = L / lambda_i and
  gamma(r) = 0 for r < alpha, 1 for r > beta, (r - alpha) / (beta - alpha) between (Eq. 18-19;
  the paper's alpha = `beta_slow` = 1, beta = `beta_fast` = 32 for Llama). The softmax becomes
  softmax(q.k / (t sqrt(H))) with sqrt(1/t) = 0.1 ln(s) + 1 (Eq. 22), which the paper applies by
  scaling both rotated q and k by sqrt(1/t): that is the attention factor returned here (1 for
  s <= 1). We follow the paper's ramp, linear in r; the authors' released code ramps linearly
  in the dimension index between rounded bounds instead, which differs slightly.

  Returns:
    (inv_freq [head_dim/2] float32, 0.1 ln(s) + 1 for s > 1 else 1.0).
  """
  _check("yarn", head_dim, theta, factor)
  _need_original_length("yarn", original_length)
  if beta_fast <= beta_slow:
    raise ValueError(f"yarn: beta_fast={beta_fast} must exceed beta_slow={beta_slow}")
  inv_freq = _ramp_blend(_base_frequencies(head_dim, theta), factor, original_length, beta_slow,
                         beta_fast)
  return _out(inv_freq, 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)


def llama3(head_dim: int, *, theta: float = 500_000.0, factor: float = 8.0,
           original_length: int = 8192, low_freq_factor: float = 1.0,
           high_freq_factor: float = 4.0) -> tuple[Array, float]:
  """Llama 3.1's scaling (Meta, 2024): the same wavelength ramp as YaRN, no attention factor.

  Frequencies with wavelength below L / high_freq_factor are kept, those above L / low_freq_factor
  are divided by s, and between them theta_i is blended as (1 - g) theta_i / s + g theta_i with
  g = (L / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor). The defaults are
  Llama 3.1's (theta 500,000, s = 8, L = 8192).

  Returns:
    (inv_freq [head_dim/2] float32, 1.0).
  """
  _check("llama3", head_dim, theta, factor)
  _need_original_length("llama3", original_length)
  if high_freq_factor <= low_freq_factor:
    raise ValueError(f"llama3: high_freq_factor={high_freq_factor} must exceed "
                     f"low_freq_factor={low_freq_factor}")
  return _out(_ramp_blend(_base_frequencies(head_dim, theta), factor, original_length,
                          low_freq_factor, high_freq_factor))


def giraffe_power(head_dim: int, *, theta: float = 10_000.0, factor: float = 1.0,
                  original_length: int = 0, exponent: float = 0.5) -> tuple[Array, float]:
  """Giraffe's power basis (Pal et al. 2023): theta_i (1 - 2i/d)^k, then PI by s.

  Slow frequencies are stretched more than fast ones (theta_0 is kept). The paper's best power
  basis used k = 0.5. `factor` composes linear interpolation with the basis change as in the
  authors' code (s = 1: the basis change alone; k = 0: plain PI).

  Returns:
    (inv_freq [head_dim/2] float32, 1.0).
  """
  del original_length
  _check("giraffe_power", head_dim, theta, factor)
  if exponent < 0:
    raise ValueError(f"giraffe_power: exponent must be >= 0, got {exponent}")
  fraction = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
  return _out(_base_frequencies(head_dim, theta) / factor * (1.0 - fraction) ** exponent)


def giraffe_truncated(head_dim: int, *, theta: float = 10_000.0, factor: float = 1.0,
                      original_length: int = 0, cutoff: float = 0.0, a_ratio: float = 8.0,
                      rho_ratio: float = 16.0) -> tuple[Array, float]:
  """Giraffe's truncated basis (Pal et al. 2023): slow frequencies become one constant, or 0.

  With theta'_i = theta_i / s: theta'_i if theta'_i >= b; rho if a <= theta'_i < b; 0 (no
  rotation) if theta'_i < a. Frequencies fast enough to turn once within `cutoff` tokens keep
  their values, b = 2 pi / cutoff; a = b / a_ratio and rho = b / rho_ratio, the constants of the
  authors' released code (8 and 16), with `cutoff` the training length L by default.

  Returns:
    (inv_freq [head_dim/2] float32, 1.0).
  """
  _check("giraffe_truncated", head_dim, theta, factor)
  cutoff = cutoff or original_length
  if cutoff <= 0:
    raise ValueError("giraffe_truncated: needs cutoff > 0 or original_length > 0 (the training "
                     f"length), got cutoff={cutoff}, original_length={original_length}")
  if a_ratio < 1 or rho_ratio <= 0:
    raise ValueError(f"giraffe_truncated: needs a_ratio >= 1 and rho_ratio > 0, got {a_ratio}, "
                     f"{rho_ratio}")
  inv_freq = _base_frequencies(head_dim, theta) / factor
  b = 2 * math.pi / cutoff
  a, rho = b / a_ratio, b / rho_ratio
  inv_freq = np.where(inv_freq >= b, inv_freq, np.where(inv_freq >= a, rho, 0.0))
  return _out(inv_freq)


# Config name (`model.posenc.scaling`) -> function. Each function's keyword-only hyperparameters
# are read from `model.posenc.<name>_<hyperparameter>` (e.g. yarn's beta_fast: yarn_beta_fast).
ROPE_SCALINGS: dict[str, ScalingFn] = {
    "none": plain,
    "linear": linear,
    "abf": abf,
    "ntk": ntk,
    "dynamic_ntk": dynamic_ntk,
    "yarn": yarn,
    "llama3": llama3,
    "giraffe_power": giraffe_power,
    "giraffe_truncated": giraffe_truncated,
}
# Methods whose frequencies depend on the current context length (their `length` argument).
DYNAMIC_SCALINGS = frozenset({"dynamic_ntk"})
# Methods that read `original_length` (giraffe_truncated only for its default cutoff).
NEEDS_ORIGINAL_LENGTH = frozenset({"dynamic_ntk", "yarn", "llama3", "giraffe_truncated"})
# Arguments every method takes; the rest are method hyperparameters.
COMMON_ARGS = frozenset({"theta", "factor", "original_length", "length"})


def scaled_rope_frequencies(method: str, head_dim: int, *, theta: float, factor: float,
                            original_length: int, length=None,
                            **hyperparameters) -> tuple[Array, float | Array]:
  """The inverse frequencies and attention factor of `method` (a `ROPE_SCALINGS` name).

  Args:
    method: the scaling's name.
    head_dim: the rotary dim R (even).
    theta: the base.
    factor: s > 0, target length / training length.
    original_length: the training length L.
    length: the current context length; read by `DYNAMIC_SCALINGS` only.
    **hyperparameters: the method's own keyword arguments (e.g. beta_fast for yarn).

  Returns:
    (inv_freq [R/2] float32, attention factor: a float, or a traced scalar for dynamic methods).

  Raises:
    ValueError: one line, for an unknown method or a bad value.
  """
  if method not in ROPE_SCALINGS:
    raise ValueError(f"unknown RoPE scaling {method!r}; valid: " + ", ".join(ROPE_SCALINGS))
  extra = {"length": length} if method in DYNAMIC_SCALINGS else {}
  return ROPE_SCALINGS[method](head_dim, theta=theta, factor=factor,
                               original_length=original_length, **extra, **hyperparameters)
