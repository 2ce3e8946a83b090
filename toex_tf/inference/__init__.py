"""Inference: the KV-cached early-exit decode loop (keras.ops; `tf_*` modules need TF)."""

from toex_tf.inference.decoding import (
    DECODE_CRITERIA,
    DECODE_MODES,
    DecoderAdapter,
    ExitPolicy,
    decode_step,
    flush_lazy,
    generate,
    pad_prompts,
    padding_state,
    prefill,
)
from toex_tf.inference.speculative import generate_speculative

__all__ = [
    "DECODE_CRITERIA",
    "DECODE_MODES",
    "DecoderAdapter",
    "ExitPolicy",
    "decode_step",
    "flush_lazy",
    "generate",
    "generate_speculative",
    "pad_prompts",
    "padding_state",
    "prefill",
]
