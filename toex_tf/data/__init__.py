"""Data: document sources, tokenizers and token streams.

Imports without TensorFlow. The `tf.data` pipeline is in `toex_tf.data.tf_pipeline`,
imported explicitly. Large corpora stream through token shards (`toex_tf.data.streaming`).
"""

from toex_tf.data.corpus import (
    builtin_corpus,
    load_documents,
    read_text_files,
    split_documents,
)
from toex_tf.data.hf_tokenizer import HFJsonTokenizer
from toex_tf.data.streaming import (
    TokenShards,
    build_token_shards,
    open_document_stream,
    split_stream,
)
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
    "TokenShards",
    "Tokenizer",
    "build_token_shards",
    "builtin_corpus",
    "encode_documents",
    "lm_windows",
    "load_documents",
    "load_tokenizer",
    "make_tokenizer",
    "open_document_stream",
    "read_text_files",
    "split_documents",
    "split_stream",
    "token_frequencies",
]
