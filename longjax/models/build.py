"""`build_model`: from a `config.model` section to an NNX `DecoderLM`."""

from flax import nnx

from longjax.models.lm import DecoderLM


def build_model(cfg, *, vocab_size: int, rngs: nnx.Rngs) -> DecoderLM:
  """Builds the `DecoderLM` that `cfg` (a `config.model` section) describes.

  Mixers and positional encodings are looked up by name in `longjax.models.registry.MIXERS` and
  `longjax.layers.positional.POSENCS`.
  """
  return DecoderLM(cfg, vocab_size=vocab_size, rngs=rngs)
