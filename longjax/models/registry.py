"""The registry of sequence mixers: name -> `MixerSpec` (`longjax.layers.mixer`).

Adding a mixer is one module in `longjax/layers` that declares its spec (config section with
defaults, validation, factory, cache types) and one entry in `MIXERS` below; adding a
positional encoding is one line in `longjax.layers.positional.POSENCS`.
"""

from longjax.layers import attention_config
from longjax.layers import based
from longjax.layers import gla
from longjax.layers import landmark
from longjax.layers import lightning
from longjax.layers import linear_attention
from longjax.layers import mamba
from longjax.layers import mamba2
from longjax.layers import mixer
from longjax.layers import retnet
from longjax.layers import s4
from longjax.layers import s4d
# Re-exported: sizes and dtypes derived from config.model (they live below the layers).
from longjax.layers.dims import DTYPES, head_dim, num_kv_heads, out_init_scale  # noqa: F401

MIXERS: dict[str, mixer.MixerSpec] = {spec.name: spec for spec in (
    attention_config.SPEC,
    linear_attention.SPEC,
    retnet.SPEC,
    lightning.SPEC,
    gla.SPEC,
    based.SPEC,
    mamba.SPEC,
    mamba2.SPEC,
    s4d.SPEC,
    s4.SPEC,
    landmark.SPEC,
)}


def parse_mixers(spec: str, model=None) -> list[mixer.MixerEntry]:
  """`model.mixers` -> one `MixerEntry` per entry of the pattern (see `longjax.layers.mixer`).

  Raises:
    ConfigError naming the bad entry and the valid choices.
  """
  return mixer.parse_pattern(spec, MIXERS, model)
