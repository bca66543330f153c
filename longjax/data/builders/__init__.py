"""TFDS dataset builders that need no download and no TensorFlow (array_record output)."""

from longjax.data.builders.text_dir import load_text_dir
from longjax.data.builders.text_dir import make_config
from longjax.data.builders.text_dir import TextDir
from longjax.data.builders.text_dir import TextDirConfig

__all__ = ["TextDir", "TextDirConfig", "load_text_dir", "make_config"]
