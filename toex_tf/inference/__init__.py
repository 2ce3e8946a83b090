"""Inference: the KV-cached early-exit decode loop (keras.ops; `tf_*` modules need TF)."""

from toex_tf.inference.decoding import (
    DECODE_MODES,
    DecoderAdapter,
    ExitPolicy,
    decode_step,
    flush_lazy,
    generate,
    prefill,
)
from toex_tf.inference.speculative import generate_speculative

__all__ = [
    "DECODE_MODES",
    "DecoderAdapter",
    "ExitPolicy",
    "decode_step",
    "flush_lazy",
    "generate",
    "generate_speculative",
    "prefill",
]
