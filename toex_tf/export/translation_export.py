"""SavedModel export of an encoder-decoder: translation with decoder exits in the graph.

Signatures:
- `translate` (also `serving_default`): `token_ids` int32 `(batch, source_len)`, the
  sources right-padded, `lengths` int32 `(batch,)`, `max_new_tokens` int32 scalar,
  `threshold` float32 scalar, `mode` string scalar (`full`, `unfrozen`, `frozen`,
  `lazy`) -> `token_ids` and `exit_layers`, int32 `(batch, max_new_tokens)`. The encoder
  runs once, each decoder layer's cross-attention keys and values are projected once,
  and the decoder runs the same loop as `toex_tf.inference.translate`; after a row's
  stop token the ids repeat it and the exit layers are 0.
- `translate_text` (unless `text_signature=False`): `source` string `(batch,)`,
  `max_new_tokens`, `threshold`, `mode` -> `text` string `(batch,)` and the two above.

Bad input fails with an `InvalidArgumentError` naming it (rank, width, lengths, ids out of
the vocabulary, threshold, mode), before any layer runs. The graph has no `Xla*` op.
"""

import os
import shutil

import keras
import tensorflow as tf

from toex_tf.data.tokenizers import Tokenizer, load_tokenizer
from toex_tf.export.graph_text import GraphTokenizer, valid_utf8
from toex_tf.export.saved_model import (
    EXPORT_MODES,
    GENERATE_SIGNATURE,
    TOKENIZER_SUBDIR,
    checked,
    ids_checks,
    mode_index,
    policy_checks,
    rank_checked,
    write_out_once,
)
from toex_tf.inference import DecoderAdapter, ExitPolicy
from toex_tf.inference.translate import translate

TRANSLATE_SIGNATURE = GENERATE_SIGNATURE
TRANSLATE_TEXT_SIGNATURE = [tf.TensorSpec([None], tf.string, name="source")] + list(
    GENERATE_SIGNATURE[2:]
)
TRANSLATION_SIGNATURES = ("translate", "serving_default")
TRANSLATE_TEXT = "translate_text"


def export_translation(
    model,
    directory: str,
    tokenizer: Tokenizer | str,
    criterion: str = "max_prob",
    decision_layers=None,
    max_pending: int = 8,
    text_signature: bool = True,
) -> str:
    """Writes an `EarlyExitTransformer` as a SavedModel that translates with exits in-graph.

    Args:
        model: an `EarlyExitTransformer`.
        directory: where to write (an existing SavedModel there is replaced).
        tokenizer: the model's tokenizer (or its directory): its eos id starts and stops
            every target; it gives `translate_text` in-graph and a copy goes under
            `directory/assets.extra/tokenizer`.
        criterion: the exit criterion.
        decision_layers: exits where a step may decide; None: every exit.
        max_pending: lazy mode's catch-up window.
        text_signature: bool, add `translate_text` (the tokenizer in the graph; with
            SentencePiece every client then needs tensorflow-text). Defaults to `True`.

    Returns:
        `directory`.
    """
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            f"SavedModel export needs KERAS_BACKEND=tensorflow; got {keras.backend.backend()!r}."
        )
    if not getattr(model, "is_encoder_decoder", False):
        raise TypeError(
            f"export_translation needs an encoder-decoder model; got {type(model).__name__} "
            "(use toex_tf.export.export_saved_model)."
        )
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if tokenizer.vocab_size > model.vocab_size:
        raise ValueError(
            f"The tokenizer's vocab_size ({tokenizer.vocab_size}) exceeds the model's "
            f"({model.vocab_size}); export with the tokenizer the model was trained with."
        )
    adapter = DecoderAdapter(model)
    start = int(tokenizer.eos_id)

    def make_policy(mode, threshold):
        return ExitPolicy(
            mode, criterion, threshold, max_pending=max_pending, decision_layers=decision_layers
        )

    adapter.decision_layers(make_policy("frozen", 0.5))  # fail now on a bad decision layer
    archive = keras.export.ExportArchive()
    archive.track(model)
    translate_fn = _translate_function(adapter, make_policy, start)
    endpoint = archive.add_endpoint("translate", translate_fn, input_signature=TRANSLATE_SIGNATURE)
    if text_signature:
        graph_tokenizer = GraphTokenizer(tokenizer, vocab_size=model.vocab_size)
        archive.track(graph_tokenizer)
        text_fn = _translate_text_function(endpoint, graph_tokenizer, start)
        archive.add_endpoint(TRANSLATE_TEXT, text_fn, input_signature=TRANSLATE_TEXT_SIGNATURE)
    write_out_once(archive, directory)
    tokenizer_dir = os.path.join(directory, TOKENIZER_SUBDIR)
    shutil.rmtree(tokenizer_dir + ".new", ignore_errors=True)
    tokenizer.save(tokenizer_dir + ".new")
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    os.replace(tokenizer_dir + ".new", tokenizer_dir)
    return directory


def _translate_function(adapter, make_policy, start: int):
    model = adapter.model
    max_source, vocab_size = model.max_source_length, adapter.vocab_size
    capacity = adapter.max_length - 1  # the start token takes position 0

    def translate_signature(token_ids, lengths, max_new_tokens, threshold, mode):
        token_ids, lengths, max_new_tokens, threshold, mode = rank_checked(
            TRANSLATE_SIGNATURE, token_ids, lengths, max_new_tokens, threshold, mode
        )
        checks = ids_checks(token_ids, lengths, vocab_size, max_source)
        checks += [
            tf.debugging.assert_greater(max_new_tokens, 0, message="max_new_tokens must be > 0"),
            tf.debugging.assert_less_equal(
                max_new_tokens,
                capacity,
                message=f"max_new_tokens exceeds the decoder's max_length - 1 = {capacity}",
            ),
        ]
        token_ids = checked(token_ids, checks + policy_checks(threshold, mode))
        width = tf.shape(token_ids)[1]
        mask = tf.cast(tf.range(width)[None, :] < lengths[:, None], tf.int32)
        source = token_ids * mask

        def branch(name):
            def run():
                return translate(
                    adapter,
                    source,
                    mask,
                    capacity,
                    start,
                    policy=make_policy(name, threshold),
                    stop_token_ids=(start,),
                    new_token_limit=max_new_tokens,
                )

            return run

        tokens, exits = tf.switch_case(mode_index(mode), [branch(n) for n in EXPORT_MODES])
        return {
            "token_ids": tokens[:, :max_new_tokens],
            "exit_layers": exits[:, :max_new_tokens],
        }

    return translate_signature


def _translate_text_function(endpoint, graph_tokenizer, start: int):
    def translate_text_signature(source, max_new_tokens, threshold, mode):
        source, max_new_tokens, threshold, mode = rank_checked(
            TRANSLATE_TEXT_SIGNATURE, source, max_new_tokens, threshold, mode
        )
        source = checked(
            source,
            [
                tf.debugging.Assert(
                    tf.reduce_all(valid_utf8(source)), ["every source must be valid UTF-8"]
                ),
                tf.debugging.Assert(
                    tf.reduce_all(tf.strings.length(source) > 0),
                    ["every source must be non-empty text"],
                ),
                tf.debugging.assert_greater(
                    tf.size(source), 0, message="source is empty: give at least one sentence"
                ),
            ],
        )
        ids = graph_tokenizer.encode(source)
        out = endpoint(
            token_ids=ids.to_tensor(0),
            lengths=tf.cast(ids.row_lengths(), tf.int32),
            max_new_tokens=max_new_tokens,
            threshold=threshold,
            mode=mode,
        )
        tokens = out["token_ids"]
        keep = tf.equal(tf.cumsum(tf.cast(tf.equal(tokens, start), tf.int32), axis=1), 0)
        return {
            "text": graph_tokenizer.decode(tokens, keep),
            "token_ids": tokens,
            "exit_layers": out["exit_layers"],
        }

    return translate_text_signature
