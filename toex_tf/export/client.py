"""Calling a loaded export from Python: the signatures' inputs as arguments, NumPy out
(what the tests, the notebook and a serving client compare with in-Python output)."""

import numpy as np
import tensorflow as tf

from toex_tf.export.saved_model import TEXT_SIGNATURE


def _int32(name: str, value):
    """`value` as an int32 tensor; a `TypeError` naming `name` for non-integer values
    (NumPy would truncate 1.5 to 1 without a word)."""
    array = np.asarray(value)
    if array.size and array.dtype.kind not in "iu":  # an empty list reads as float64
        raise TypeError(f"{name} must hold integers; got dtype {array.dtype}: {value!r}.")
    return tf.constant(array.astype("int32"))


def generate_with_export(loaded, token_ids, lengths, max_new_tokens, threshold, mode):
    """Calls a loaded export's `generate` signature with numpy inputs; numpy outputs."""
    out = loaded.signatures["generate"](
        token_ids=_int32("token_ids", token_ids),
        lengths=_int32("lengths", lengths),
        max_new_tokens=_int32("max_new_tokens", max_new_tokens),
        threshold=tf.constant(float(threshold), tf.float32),
        mode=tf.constant(mode),
    )
    return np.asarray(out["token_ids"]), np.asarray(out["exit_layers"])


def score_with_export(loaded, token_ids, lengths, threshold, mode):
    """Calls a loaded export's `score` signature with numpy inputs; numpy outputs."""
    out = loaded.signatures["score"](
        token_ids=_int32("token_ids", token_ids),
        lengths=_int32("lengths", lengths),
        threshold=tf.constant(float(threshold), tf.float32),
        mode=tf.constant(mode),
    )
    return np.asarray(out["logits"]), np.asarray(out["exit_layers"])


def generate_text_with_export(loaded, prompts, max_new_tokens, threshold, mode):
    """Calls a loaded export's `generate_text` signature; (list of str, tokens, exits)."""
    out = loaded.signatures[TEXT_SIGNATURE](
        prompt=tf.constant(list(prompts), tf.string),
        max_new_tokens=_int32("max_new_tokens", max_new_tokens),
        threshold=tf.constant(float(threshold), tf.float32),
        mode=tf.constant(mode),
    )
    texts = [t.decode("utf-8") for t in out["text"].numpy()]
    return texts, np.asarray(out["token_ids"]), np.asarray(out["exit_layers"])
