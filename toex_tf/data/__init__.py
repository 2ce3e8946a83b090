"""Data: document sources, tokenizers and token streams.

Imports without TensorFlow. The `tf.data` pipeline is in `toex_tf.data.tf_pipeline`,
imported explicitly.
"""

from toex_tf.data.corpus import (
    builtin_corpus,
    load_documents,
    read_text_files,
    split_documents,
)
from toex_tf.data.hf_tokenizer import HFJsonTokenizer
from toex_tf.data.token_stream import encode_documents, lm_windows, token_frequencies
from toex_tf.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    make_tokenizer,
)

__all__ = [
    "ByteTokenizer",
    "HFJsonTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "builtin_corpus",
    "encode_documents",
    "lm_windows",
    "load_documents",
    "load_tokenizer",
    "make_tokenizer",
    "read_text_files",
    "split_documents",
    "token_frequencies",
]
