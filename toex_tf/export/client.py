"""Calling a loaded export from Python: the signatures' inputs as arguments, NumPy out
(what the tests, the notebook and a serving client compare with in-Python output)."""

import numpy as np
import tensorflow as tf

from toex_tf.export.saved_model import TEXT_SIGNATURE


def generate_with_export(loaded, token_ids, lengths, max_new_tokens, threshold, mode):
    """Calls a loaded export's `generate` signature with numpy inputs; numpy outputs."""
    out = loaded.signatures["generate"](
        token_ids=tf.constant(np.asarray(token_ids, "int32")),
        lengths=tf.constant(np.asarray(lengths, "int32")),
        max_new_tokens=tf.constant(int(max_new_tokens), tf.int32),
        threshold=tf.constant(float(threshold), tf.float32),
        mode=tf.constant(mode),
    )
    return np.asarray(out["token_ids"]), np.asarray(out["exit_layers"])


def score_with_export(loaded, token_ids, lengths, threshold, mode):
    """Calls a loaded export's `score` signature with numpy inputs; numpy outputs."""
    out = loaded.signatures["score"](
        token_ids=tf.constant(np.asarray(token_ids, "int32")),
        lengths=tf.constant(np.asarray(lengths, "int32")),
        threshold=tf.constant(float(threshold), tf.float32),
        mode=tf.constant(mode),
    )
    return np.asarray(out["logits"]), np.asarray(out["exit_layers"])


def generate_text_with_export(loaded, prompts, max_new_tokens, threshold, mode):
    """Calls a loaded export's `generate_text` signature; (list of str, tokens, exits)."""
    out = loaded.signatures[TEXT_SIGNATURE](
        prompt=tf.constant(list(prompts), tf.string),
        max_new_tokens=tf.constant(int(max_new_tokens), tf.int32),
        threshold=tf.constant(float(threshold), tf.float32),
        mode=tf.constant(mode),
    )
    texts = [t.decode("utf-8") for t in out["text"].numpy()]
    return texts, np.asarray(out["token_ids"]), np.asarray(out["exit_layers"])
