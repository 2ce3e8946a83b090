"""The translation SavedModel: `translate` equals Python for every mode, also in a fresh
process without toex_tf; text and errors."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from depth_dependent import make_depth_dependent
from serving_helpers import WITHOUT_TOEX_TF, fresh_process

from toex_tf.data.tokenizers import ByteTokenizer
from toex_tf.export import xla_ops
from toex_tf.export.translation_export import export_translation
from toex_tf.inference import DecoderAdapter, ExitPolicy
from toex_tf.inference.translate import pad_sources, translate
from toex_tf.models import build_transformer

TOKENIZER = ByteTokenizer()
SOURCES = ["cat", "a dog ran"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    keras.utils.set_random_seed(2)
    model = build_transformer("tiny", vocab_size=257, num_layers=3, max_length=12)
    # Layers that move the residual stream and sharper embeddings: exits vary by token.
    make_depth_dependent(model, embedding_scale=8.0)
    directory = str(tmp_path_factory.mktemp("export") / "saved")
    export_translation(model, directory, tokenizer=TOKENIZER)
    return model, directory, tf.saved_model.load(directory)


def test_translate_equals_python_in_every_mode_and_has_no_xla_ops(exported):
    model, directory, loaded = exported
    assert xla_ops(directory) == []
    ids, mask = pad_sources([TOKENIZER.encode(s) for s in SOURCES])
    lengths = mask.sum(1).astype("int32")
    adapter = DecoderAdapter(model)
    varied = False
    for mode in ("full", "unfrozen", "frozen", "lazy"):
        for threshold in (0.02, 0.05, 0.2):
            out = loaded.signatures["translate"](
                token_ids=tf.constant(ids),
                lengths=tf.constant(lengths),
                max_new_tokens=tf.constant(8),
                threshold=tf.constant(threshold),
                mode=tf.constant(mode),
            )
            policy = ExitPolicy(mode, "max_prob", threshold, max_pending=8)
            tokens, exits = translate(
                adapter, ids, mask, 11, TOKENIZER.eos_id, policy=policy, stop_token_ids=(256,)
            )
            np.testing.assert_array_equal(out["token_ids"].numpy(), np.asarray(tokens)[:, :8])
            np.testing.assert_array_equal(out["exit_layers"].numpy(), np.asarray(exits)[:, :8])
            varied |= len(set(np.asarray(exits)[:, :8].ravel()) - {0}) >= 2
    assert varied  # some setting exits at more than one layer: the equality covers exits


def test_translate_text_and_bad_input(exported):
    _, _, loaded = exported
    text = loaded.signatures["translate_text"](
        source=tf.constant(SOURCES),
        max_new_tokens=tf.constant(8),
        threshold=tf.constant(1.0),
        mode=tf.constant("full"),
    )
    ids = text["token_ids"].numpy()
    for row, decoded in zip(ids, text["text"].numpy()):
        kept = list(row[: list(row).index(256)] if 256 in row else row)
        assert decoded.decode() == TOKENIZER.decode(kept)
    call = loaded.signatures["translate"]
    good = dict(
        token_ids=tf.constant([[99, 97]]),
        lengths=tf.constant([2]),
        max_new_tokens=tf.constant(4),
        threshold=tf.constant(0.5),
        mode=tf.constant("lazy"),
    )
    for change, message in [
        ({"token_ids": tf.constant([[300, 97]])}, "vocabulary"),
        ({"lengths": tf.constant(2)}, "lengths must be a vector"),
        ({"max_new_tokens": tf.constant(12)}, "max_new_tokens exceeds"),
        ({"mode": tf.constant("fast")}, "unknown mode"),
        ({"token_ids": tf.ones((1, 17), tf.int32), "lengths": tf.constant([17])}, "wider"),
    ]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            call(**{**good, **change})


FRESH_PROCESS = (
    WITHOUT_TOEX_TF
    + """
loaded = tf.saved_model.load(sys.argv[1])
ids, lengths, sources = (json.loads(a) for a in sys.argv[2:5])
result = {}
for mode in ("full", "unfrozen", "frozen", "lazy"):
    out = loaded.signatures["translate"](
        token_ids=tf.constant(ids, tf.int32), lengths=tf.constant(lengths, tf.int32),
        max_new_tokens=tf.constant(8), threshold=tf.constant(0.05), mode=tf.constant(mode))
    text = loaded.signatures["translate_text"](
        source=tf.constant(sources), max_new_tokens=tf.constant(8),
        threshold=tf.constant(0.05), mode=tf.constant(mode))
    result[mode] = [out["token_ids"].numpy().tolist(), out["exit_layers"].numpy().tolist(),
                    [t.decode() for t in text["text"].numpy()]]
print("RESULT", json.dumps(result))
"""
)


def test_fresh_process_without_toex_tf_translates_as_python(exported, tmp_path):
    model, directory, loaded = exported
    ids, mask = pad_sources([TOKENIZER.encode(s) for s in SOURCES])
    lengths = mask.sum(1).astype("int32")
    args = (json.dumps(a) for a in (ids.tolist(), lengths.tolist(), SOURCES))
    result = fresh_process(FRESH_PROCESS, tmp_path, directory, *args)
    adapter = DecoderAdapter(model)
    for mode, (tokens, exits, texts) in result.items():
        policy = ExitPolicy(mode, "max_prob", 0.05, max_pending=8)
        want, want_exits = translate(
            adapter, ids, mask, 11, TOKENIZER.eos_id, policy=policy, stop_token_ids=(256,)
        )
        want, want_exits = np.asarray(want)[:, :8], np.asarray(want_exits)[:, :8]
        np.testing.assert_array_equal(tokens, want, err_msg=mode)
        np.testing.assert_array_equal(exits, want_exits, err_msg=mode)
        for row, text in zip(want.tolist(), texts):
            kept = row[: row.index(256)] if 256 in row else row
            assert text == TOKENIZER.decode(kept), mode
