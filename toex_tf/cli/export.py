"""`--mode=export`: the run's model → a SavedModel whose signatures run the decode loop
in the graph (`toex_tf.export`), with `generate_text` when the tokenizer allows it."""

import json
import os
import sys

from toex_tf.cli.common import append_to_config_log, load_run_model, model_source
from toex_tf.cli.flags import FLAGS, policy_options


def run() -> dict:
    from toex_tf.export import SIGNATURES, TEXT_SIGNATURE  # noqa: PLC0415 - TensorFlow

    directory = FLAGS.export_dir or os.path.join(FLAGS.output_dir, "saved_model")
    lm = load_run_model()
    where = f"the tokenizer of {model_source()!r}"
    with_text, note = text_export_choice(lm.tokenizer, FLAGS.export_text, where)
    if note:
        print(f"No {TEXT_SIGNATURE} signature: {note}", file=sys.stderr)
    # Rows stop at the tokenizer's end-of-text id, as --mode=generate does (AdaptiveLM).
    options = policy_options()
    if lm.model.is_encoder_decoder:
        from toex_tf.export.translation_export import (  # noqa: PLC0415
            TRANSLATE_TEXT,
            TRANSLATION_SIGNATURES,
            export_translation,
        )

        export_translation(
            lm.model,
            directory,
            lm.tokenizer,
            criterion=FLAGS.decode_criterion or lm.policy.criterion,
            decision_layers=options["decision_layers"],
            max_pending=options["max_pending"],
            text_signature=with_text,
        )
        signatures = list(TRANSLATION_SIGNATURES) + ([TRANSLATE_TEXT] if with_text else [])
        result = {"saved_model": directory, "signatures": signatures}
        print(json.dumps(result))
        append_to_config_log(export=result)
        return result
    lm.export(
        directory,
        criterion=FLAGS.decode_criterion or lm.policy.criterion,
        decision_layers=options["decision_layers"],
        max_pending=options["max_pending"],
        patience=options["patience"],
        threshold_decay=options["threshold_decay"],
        tokenizer=lm.tokenizer if with_text else None,
    )
    signatures = list(SIGNATURES) + ([TEXT_SIGNATURE] if with_text else [])
    result = {"saved_model": directory, "signatures": signatures}
    print(json.dumps(result))
    append_to_config_log(export=result)
    return result


def text_export_choice(tokenizer, export_text: str, where: str = "OUTPUT_DIR/tokenizer"):
    """`--export_text`: whether `generate_text` goes into the export, and why not (or None).

    auto: only when core TF ops suffice (the byte tokenizer). SentencePiece is
    tensorflow-text's custom op: clients without it (`saved_model_cli`, a plain TF
    process) could not load the export at all, so it goes in only on `yes`.

    Raises:
        ValueError: `yes` when the tokenizer has no in-graph form here.
    """
    from toex_tf.data.tokenizers import ByteTokenizer, SentencePieceTokenizer  # noqa: PLC0415

    if export_text == "no":
        return False, None
    if isinstance(tokenizer, ByteTokenizer):
        return True, None
    if tokenizer is None:
        problem = f"no tokenizer ({where})"
    elif not isinstance(tokenizer, SentencePieceTokenizer):
        problem = f"{type(tokenizer).__name__} has no in-graph form"
    elif export_text == "auto":
        return False, (
            "SentencePiece in the graph is tensorflow-text's custom op, which every client "
            "that loads the export then needs; --export_text=yes adds it"
        )
    else:
        try:
            import tensorflow_text  # noqa: F401, PLC0415
        except Exception as error:  # noqa: BLE001  (a build for another TF fails to load ops)
            problem = (
                "SentencePiece in the graph needs tensorflow-text matching this TensorFlow "
                f"(pip install 'toex-tf[text]'); importing it failed: {error}"
            )
        else:
            return True, None
    if export_text == "yes":
        raise ValueError(f"--export_text=yes: {problem}")
    return False, problem
