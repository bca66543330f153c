"""The layer pattern `model.mixers`: entries, aliases and per-layer overrides, parsed against a
made-up registry, so the parser is checked apart from any real mixer."""

from absl.testing import absltest
import ml_collections

import jax.numpy as jnp

from longjax.errors import ConfigError
from longjax.layers import caches
from longjax.layers import mixer


def _defaults():
  return ml_collections.ConfigDict(
      {"window": 0, "scale": 1.0, "gated": False, "kind": "plain"})


_TOY = mixer.MixerSpec(name="toy", aliases=("t",), section="toy", defaults=_defaults,
                       validate=lambda *a: None, build=lambda *a: None, cache_types=())
_OTHER = mixer.MixerSpec(name="other", section="other", defaults=ml_collections.ConfigDict,
                         validate=lambda *a: None, build=lambda *a: None, cache_types=())
REGISTRY = {"toy": _TOY, "other": _OTHER}


class ParsePatternTest(absltest.TestCase):

  def test_entries_aliases_and_typed_overrides(self):
    entries = mixer.parse_pattern(
        " toy(window=8, scale=0.5, gated=True, kind='fancy'), t ,other", REGISTRY)
    self.assertEqual([e.spec.name for e in entries], ["toy", "toy", "other"])
    self.assertEqual(entries[0].overrides,
                     (("window", 8), ("scale", 0.5), ("gated", True), ("kind", "fancy")))
    self.assertEqual(entries[1].overrides, ())
    model = ml_collections.ConfigDict({"toy": _defaults(), "other": {}})
    layer0 = entries[0].config(model)
    self.assertEqual((layer0.window, layer0.scale, layer0.gated, layer0.kind),
                     (8, 0.5, True, "fancy"))
    self.assertEqual(model.toy.window, 0)  # the shared section is not changed
    self.assertEqual(entries[0].field_prefix(0), "model.mixers[0]:toy")
    self.assertEqual(entries[1].field_prefix(1), "model.toy")

  def test_errors_name_the_entry_and_the_choices(self):
    for pattern, message in (
        ("toy,mamba", "unknown mixer 'mamba'; valid: other, t, toy"),
        ("", "is empty; valid mixers: other, t, toy"),
        ("toy(windw=3)", "toy has no field 'windw' (valid: gated, kind, scale, window)"),
        ("toy(window)", "'toy(window)': an override is field=value, got 'window'"),
        ("toy(window=3.5)", "'3.5' is not a int"),
        ("toy(gated=yes)", "'yes' is not a bool"),
    ):
      with self.subTest(pattern=pattern):
        with self.assertRaises(ConfigError) as ctx:
          mixer.parse_pattern(pattern, REGISTRY)
        self.assertEqual(ctx.exception.field, "model.mixers")
        self.assertIn(message, str(ctx.exception))
        self.assertNotIn("\n", str(ctx.exception))


class CacheBytesTest(absltest.TestCase):

  def test_state_bytes_per_sequence(self):
    # K/V caches grow with their capacity (2 tensors x S x K x H x itemsize); a rolling cache
    # and a recurrent state do not.
    self.assertEqual(caches.KVCache.empty(3, 16, 2, 8, jnp.bfloat16).state_bytes_per_sequence,
                     2 * 16 * 2 * 8 * 2)
    self.assertEqual(caches.RollingCache.empty(3, 6, 2, 8, jnp.float32).state_bytes_per_sequence,
                     2 * 6 * 2 * 8 * 4)
    self.assertEqual(caches.RecurrentState.empty((3, 4, 8, 9)).state_bytes_per_sequence,
                     4 * 8 * 9 * 4)


if __name__ == "__main__":
  absltest.main()
