"""Data: tokenizers, the `text_dir` TFDS builder and the grain input pipelines."""

from longjax.data.builders.text_dir import load_text_dir
from longjax.data.builders.text_dir import TextDir
from longjax.data.pipeline import eval_sequences
from longjax.data.pipeline import make_train_iterator
from longjax.data.tokenizers import build_tokenizer
from longjax.data.tokenizers import ByteTokenizer
from longjax.data.tokenizers import SentencePieceTokenizer
from longjax.data.tokenizers import Tokenizer
from longjax.data.corpus import Corpus
from longjax.data.corpus import load_corpus

__all__ = ["ByteTokenizer", "Corpus", "SentencePieceTokenizer", "TextDir", "Tokenizer",
           "build_tokenizer", "eval_sequences", "load_corpus", "load_text_dir",
           "make_train_iterator"]
