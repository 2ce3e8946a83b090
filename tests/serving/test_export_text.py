"""Text in, text out: the in-graph tokenizers equal the Python ones, and the export's
`generate_text` signature equals Python tokenize -> generate -> decode, here and in a
fresh process without toex_tf."""

import json
import os
import random

import keras
import numpy as np
import pytest
import sentencepiece
import tensorflow as tf
from serving_helpers import fresh_process

from toex_tf.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)
from toex_tf.export import (
    EXPORT_MODES,
    TEXT_SIGNATURE,
    TOKENIZER_SUBDIR,
    export_saved_model,
    generate_text_with_export,
    xla_ops,
)
from toex_tf.export.graph_text import GraphTokenizer
from toex_tf.inference import DecoderAdapter, ExitPolicy, generate, pad_prompts
from toex_tf.models import build_gpt

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards read long books".split()
TEXTS = [
    "Hello world",
    " leading space",
    "two  spaces and a trailing one ",
    "lines\nand\n\nparagraphs",
    "naïve café ✓ 日本語 🙂 42.",
    "\tTabbed, ünïcödé",
    "a",
]


def _documents(seed=0):
    rng = random.Random(seed)
    return [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
        for _ in range(300)
    ]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Byte; ours (identity normalisation, dummy prefix); Llama-style (the sentencepiece
    defaults TinyLlama uses: NFKC, whitespace collapsing, bos/eos/unk at 1/2/0)."""
    ours = SentencePieceTokenizer.train(_documents(), 320, str(tmp_path_factory.mktemp("spm")))
    llama_dir = tmp_path_factory.mktemp("llama_spm")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_documents(1)),
        model_prefix=str(llama_dir / "tokenizer"),
        vocab_size=320,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    llama = SentencePieceTokenizer(str(llama_dir / "tokenizer.model"))
    return {"byte": ByteTokenizer(), "ours": ours, "llama": llama}


@pytest.mark.parametrize("name", ["byte", "ours", "llama"])
def test_in_graph_encode_equals_python(tokenizers, name):
    tokenizer = tokenizers[name]
    encoded = GraphTokenizer(tokenizer).encode(tf.constant(TEXTS)).to_list()
    assert encoded == [tokenizer.encode(text) for text in TEXTS]


def _random_rows(tokenizer, rng, rows=400):
    """Id rows of random length: any id, or mostly byte-level ids (invalid UTF-8 runs)."""
    vocab = tokenizer.vocab_size
    low, high = (0, 256) if vocab == 257 else (0, vocab)
    out = []
    for row in range(rows):
        n = int(rng.integers(1, 12))
        if row % 2:
            out.append(rng.integers(0, vocab, n).tolist())
        else:  # SentencePiece's byte pieces sit right after its special ids
            out.append(rng.integers(low, min(high, 262), n).tolist())
    out.append(tokenizer.encode("x\ufffdy"))  # a literal U+FFFD stays one character
    return out


def _edge_rows(tokenizer):
    """Byte pieces split by a control piece (SentencePiece keeps their bytes apart, so
    E6 | eos | 97 A5 is not one character) and ids past the tokenizer's vocabulary."""
    vocab = tokenizer.vocab_size
    past = [vocab, vocab + 3]  # the model's vocabulary may be larger: they decode to nothing
    if isinstance(tokenizer, ByteTokenizer):
        return [[0xE6, 0x97, 0xA5], [0xE6, past[0], 0x97, 0xA5], [0xE6, 256, 0x97, 0xA5]]
    piece = {tokenizer.id_to_piece(i): i for i in range(vocab)}
    e6, x97, a5 = piece["<0xE6>"], piece["<0x97>"], piece["<0xA5>"]
    rows = [[e6, x97, a5], [e6, past[1], x97, a5]]
    rows += [[e6, control, x97, a5] for control in tokenizer.control_ids()]
    return rows


@pytest.mark.parametrize("name", ["byte", "ours", "llama"])
def test_in_graph_decode_equals_python_after_a_prompt(tokenizers, name):
    tokenizer = tokenizers[name]
    rows = _random_rows(tokenizer, np.random.default_rng(0)) + _edge_rows(tokenizer)
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), "int32")
    keep = np.zeros((len(rows), width), bool)
    for r, row in enumerate(rows):
        ids[r, : len(row)], keep[r, : len(row)] = row, True
    ids[~keep] = tokenizer.encode("Z")[0]  # dropped by `keep`, so never decoded
    graph = GraphTokenizer(tokenizer, vocab_size=tokenizer.vocab_size + 5)
    texts = graph.decode(tf.constant(ids), tf.constant(keep)).numpy()
    prompt = tokenizer.encode("Say")
    invalid = 0
    for row, text in zip(rows, texts):
        text = text.decode("utf-8")
        # What the ids add after a prompt, as Python decodes the whole sequence.
        want = tokenizer.decode(prompt + row)[len(tokenizer.decode(prompt)) :]
        assert text == want, row
        invalid += "\ufffd" in text
    assert invalid > 20  # the replacement of invalid UTF-8 was exercised


class _NoGraphForm(Tokenizer):
    vocab_size = 10
    eos_id = 0

    def encode(self, text):
        return [1]

    def decode(self, ids):
        return ""

    def save(self, directory):
        return directory


def test_tokenizers_without_an_in_graph_form_are_refused():
    with pytest.raises(TypeError, match="supports ByteTokenizer and SentencePieceTokenizer"):
        GraphTokenizer(_NoGraphForm())


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path):
    model = build_gpt("tiny", num_layers=2, max_length=16)  # vocabulary 64
    with pytest.raises(ValueError, match=r"vocab_size \(257\) exceeds the model's \(64\)"):
        export_saved_model(model, str(tmp_path / "x"), tokenizer=ByteTokenizer())


PROMPTS = ["Hello there", "a", "naïve ✓ 🙂", "the c"]


def _model_and_stop(tokenizer):
    """A tiny GPT fitted to a cycle of text, plus a stop token it emits mid-row.

    An untrained tiny model repeats one token, so it never shows a row cut at its stop
    token; 150 steps on "the cat sat. " make its continuations vary.
    """
    keras.utils.set_random_seed(0)  # module fixtures run before the autouse seed
    model = build_gpt(
        "tiny", num_layers=3, exit_layers="all", max_length=48, vocab_size=tokenizer.vocab_size
    )
    cycle = tokenizer.encode("the cat sat. " * 12)
    rows = np.array([cycle[i : i + 25] for i in range(12)], "int32")
    optimizer = keras.optimizers.Adam(3e-3)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = model(rows[:, :-1], training=True)["exit_logits"]
            loss = sum(
                tf.reduce_mean(
                    keras.losses.sparse_categorical_crossentropy(rows[:, 1:], x, from_logits=True)
                )
                for x in logits
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    for _ in range(150):
        step()
    prompt, mask = pad_prompts([tokenizer.encode(p) for p in PROMPTS])
    adapter = DecoderAdapter(model)
    policy = ExitPolicy("lazy", "max_prob", 0.45)
    tokens = np.asarray(generate(adapter, prompt, 10, policy, padding_mask=mask)[0])
    for row in tokens:
        for column in range(2, len(row)):
            if row[column] not in row[:column]:
                return model, int(row[column])
    raise AssertionError(f"the fitted model's rows never change token: {tokens.tolist()}")


@pytest.fixture(scope="module")
def text_exports(tokenizers, tmp_path_factory):
    exports = {}
    for name in ("byte", "ours"):
        directory = str(tmp_path_factory.mktemp(f"{name}_export"))
        model, stop = _model_and_stop(tokenizers[name])
        stop_ids = (tokenizers[name].eos_id, stop)
        export_saved_model(model, directory, stop_token_ids=stop_ids, tokenizer=tokenizers[name])
        exports[name] = (model, stop, directory, tf.saved_model.load(directory))
    return exports


@pytest.mark.parametrize("name", ["byte", "ours"])
def test_generate_text_equals_python(tokenizers, text_exports, name):
    tokenizer = tokenizers[name]
    model, stop, _, loaded = text_exports[name]
    adapter = DecoderAdapter(model)
    prompt, mask = pad_prompts([tokenizer.encode(p) for p in PROMPTS])
    cut = early = 0
    for mode in EXPORT_MODES:
        for threshold in (0.0, 0.45):
            texts, tokens, exits = generate_text_with_export(loaded, PROMPTS, 10, threshold, mode)
            policy = ExitPolicy(mode, "max_prob", threshold)
            want_tokens, want_exits = generate(
                adapter,
                prompt,
                10,
                policy,
                stop_token_ids=(tokenizer.eos_id, stop),
                padding_mask=mask,
            )
            np.testing.assert_array_equal(tokens, want_tokens, err_msg=f"{mode} {threshold}")
            np.testing.assert_array_equal(exits, want_exits, err_msg=f"{mode} {threshold}")
            for text, row, prompt_text in zip(texts, np.asarray(want_tokens).tolist(), PROMPTS):
                ended = [i for i, t in enumerate(row) if t in (tokenizer.eos_id, stop)]
                kept = row[: ended[0]] if ended else row
                cut += bool(ended) and 0 < ended[0]
                ids = tokenizer.encode(prompt_text)
                # The continuation as it reads after the prompt.
                assert prompt_text + text == tokenizer.decode(ids + kept)
                assert text == tokenizer.decode(ids + kept)[len(tokenizer.decode(ids)) :]
            early += int(((exits > 0) & (exits < 3)).sum())
    assert cut > 0  # some row stopped mid-way, so `text` was cut at its stop token
    assert early > 0  # and early exits were covered


def test_text_export_signatures_tokenizer_copy_and_no_xla(tokenizers, text_exports):
    for name, (_, _, directory, loaded) in text_exports.items():
        assert TEXT_SIGNATURE in loaded.signatures
        inputs = loaded.signatures[TEXT_SIGNATURE].structured_input_signature[1]
        assert set(inputs) == {"prompt", "max_new_tokens", "threshold", "mode"}
        outputs = loaded.signatures[TEXT_SIGNATURE].structured_outputs
        assert set(outputs) == {"text", "token_ids", "exit_layers"}
        assert xla_ops(directory) == []
        copy = load_tokenizer(f"{directory}/{TOKENIZER_SUBDIR}")
        assert copy.encode(PROMPTS[2]) == tokenizers[name].encode(PROMPTS[2])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prompts=["ok", ""]), "every prompt must be non-empty text"),
        (dict(prompts=[]), "prompt is empty: give at least one prompt"),
        (dict(prompts=[b"ok\xff"]), "every prompt must be valid UTF-8"),
        (dict(prompts=["x" * 46]), "exceeds max_length=48"),
        (dict(max_new_tokens=0), "max_new_tokens must be > 0"),
        (dict(threshold=1.5), r"threshold must be in \[0, 1\]"),
        (dict(mode="fast"), "unknown mode"),
    ],
)
def test_bad_input_to_generate_text(text_exports, change, message):
    loaded = text_exports["byte"][3]
    args = dict(prompts=["ok"], max_new_tokens=4, threshold=0.5, mode="frozen")
    args.update(change)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        generate_text_with_export(loaded, **args)


FRESH_PROCESS = """
import json, sys
sys.modules["toex_tf"] = None  # toex_tf must not be importable here
import tensorflow as tf
def run(directory):
    out = tf.saved_model.load(directory).signatures["generate_text"](
        prompt=tf.constant(json.loads(sys.argv[3])), max_new_tokens=tf.constant(10),
        threshold=tf.constant(0.45), mode=tf.constant("lazy"))
    return [t.decode("utf-8") for t in out["text"].numpy()]
byte = run(sys.argv[1])  # core TF ops only: no tensorflow_text imported yet
assert "tensorflow_text" not in sys.modules
import tensorflow_text  # registers the SentencePiece op
print("RESULT", json.dumps([byte, run(sys.argv[2])]))
"""


def test_fresh_process_without_toex_tf_generates_the_same_text(text_exports, tmp_path):
    directories = [text_exports[name][2] for name in ("byte", "ours")]
    result = fresh_process(FRESH_PROCESS, tmp_path, *directories, json.dumps(PROMPTS))
    for name, texts in zip(("byte", "ours"), result):
        want, _, _ = generate_text_with_export(text_exports[name][3], PROMPTS, 10, 0.45, "lazy")
        assert texts == want
        assert any(texts)


def test_cli_export_text_choice(tokenizers):
    from toex_tf.cli.export import text_export_choice  # noqa: PLC0415

    byte, sentencepiece = tokenizers["byte"], tokenizers["ours"]
    assert text_export_choice(byte, "auto") == (True, None)
    assert text_export_choice(byte, "no") == (False, None)
    # SentencePiece is a custom op every client would need: only on request.
    with_text, why = text_export_choice(sentencepiece, "auto")
    assert not with_text and "--export_text=yes" in why
    assert text_export_choice(sentencepiece, "yes") == (True, None)
    assert text_export_choice(None, "auto")[0] is False
    with pytest.raises(ValueError, match="--export_text=yes: no tokenizer"):
        text_export_choice(None, "yes")
    with pytest.raises(ValueError, match="_NoGraphForm has no in-graph form"):
        text_export_choice(_NoGraphForm(), "yes")


def test_re_export_from_the_exports_own_tokenizer_copy(tokenizers, tmp_path):
    tokenizer = tokenizers["ours"]
    model = build_gpt("tiny", num_layers=1, max_length=16, vocab_size=tokenizer.vocab_size)
    directory = str(tmp_path / "export")
    export_saved_model(model, directory, tokenizer=tokenizer)
    copy = f"{directory}/{TOKENIZER_SUBDIR}"
    export_saved_model(model, directory, tokenizer=copy)  # reads the copy it replaces
    assert load_tokenizer(copy).encode(TEXTS[4]) == tokenizer.encode(TEXTS[4])
    export_saved_model(model, directory)  # no tokenizer now: no stale copy either
    assert not os.path.exists(copy)
