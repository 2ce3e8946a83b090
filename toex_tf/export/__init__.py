"""SavedModel export: the early-exit decode loop in the graph, for TF Serving and TF-Hub.

saved_model  `export_saved_model`: signatures `generate`, `score`, `logits` (and
             `generate_text` with an in-graph tokenizer), TF-Hub reusable attributes
graph_text   the tokenizers as TF ops (byte on core ops, SentencePiece through
             tensorflow-text)
client       calling a loaded export from Python
translation_export  `export_translation`: an encoder-decoder's `translate` (and
             `translate_text`) signatures
"""

from toex_tf.export.client import (
    generate_text_with_export,
    generate_with_export,
    score_with_export,
)
from toex_tf.export.saved_model import (
    EXPORT_MODES,
    SIGNATURES,
    TEXT_SIGNATURE,
    TOKENIZER_SUBDIR,
    export_saved_model,
    final_logits,
    xla_ops,
)
from toex_tf.export.translation_export import export_translation

__all__ = [
    "EXPORT_MODES",
    "SIGNATURES",
    "TEXT_SIGNATURE",
    "TOKENIZER_SUBDIR",
    "export_saved_model",
    "export_translation",
    "final_logits",
    "generate_text_with_export",
    "generate_with_export",
    "score_with_export",
    "xla_ops",
]
