"""Tests for toex_tf.data.tokenizers: byte and SentencePiece tokenizers, save/load."""

import json
import random

import pytest

from toex_tf.data.corpus import builtin_corpus
from toex_tf.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    make_tokenizer,
)

# fmt: off
WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
    "wizards", "quietly", "hex", "jolly", "zebras", "and", "many", "people", "read", "long",
    "books", "about", "rivers", "mountains", "cities", "history", "music", "science",
]
# fmt: on

TRICKY_TEXT = "First line,  two spaces.\n\nSecond paragraph: naïve café ✓ 日本語 42.\n\tTabbed."


def make_documents(num_documents=200, seed=0):
    rng = random.Random(seed)
    documents = []
    for _ in range(num_documents):
        lines = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
            for _ in range(rng.randint(1, 4))
        ]
        documents.append("\n".join(lines))
    return documents


@pytest.fixture(scope="module")
def documents():
    return make_documents()


@pytest.fixture(scope="module")
def sentencepiece_dir(documents, tmp_path_factory):
    model_dir = str(tmp_path_factory.mktemp("spm"))
    SentencePieceTokenizer.train(documents, 400, model_dir)
    return model_dir


# Byte tokenizer --------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_non_ascii():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode(TRICKY_TEXT)
    assert ids == list(TRICKY_TEXT.encode("utf-8"))
    assert len(ids) > len(TRICKY_TEXT)  # Multi-byte characters take several ids.
    assert tokenizer.decode(ids) == TRICKY_TEXT
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)


def test_byte_tokenizer_decode_skips_special_ids_and_replaces_bad_bytes():
    tokenizer = ByteTokenizer()
    assert tokenizer.decode([104, 256, 105, 999, -1]) == "hi"
    assert tokenizer.decode([0xC3]) == "\ufffd"  # A truncated two-byte character.


def test_byte_tokenizer_save_and_load(tmp_path):
    with open(ByteTokenizer().save(str(tmp_path)), encoding="utf-8") as manifest:
        assert json.load(manifest) == {"type": "byte"}
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)


# SentencePiece tokenizer -----------------------------------------------------------------


def test_sentencepiece_round_trip_is_lossless(sentencepiece_dir, documents):
    tokenizer = load_tokenizer(sentencepiece_dir)
    assert isinstance(tokenizer, SentencePieceTokenizer)
    assert tokenizer.vocab_size == 400
    for text in [*documents[:20], TRICKY_TEXT, "\n\nleading newlines", "trailing  "]:
        ids = tokenizer.encode(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.decode(ids) == text
    # Unseen characters use byte fallback, never the unknown id (0).
    assert 0 not in tokenizer.encode(TRICKY_TEXT)
    assert tokenizer.id_to_piece(tokenizer.eos_id) == "</s>"


def test_sentencepiece_compresses_and_skips_eos(sentencepiece_dir, documents):
    tokenizer = load_tokenizer(sentencepiece_dir)
    text = documents[0]
    ids = tokenizer.encode(text)
    assert len(ids) < len(text.encode("utf-8")) / 2  # Learned merges, not bytes.
    assert tokenizer.decode([*ids, tokenizer.eos_id]) == text
    assert tokenizer.encode_batch(documents[:3]) == [tokenizer.encode(d) for d in documents[:3]]


def test_sentencepiece_training_is_deterministic(documents, tmp_path):
    first = SentencePieceTokenizer.train(documents, 400, str(tmp_path / "first"))
    second = SentencePieceTokenizer.train(documents, 400, str(tmp_path / "second"))
    first_bytes = (tmp_path / "first" / "tokenizer.model").read_bytes()
    assert first_bytes == (tmp_path / "second" / "tokenizer.model").read_bytes()
    assert first.encode_batch(documents) == second.encode_batch(documents)


def test_sentencepiece_unigram_also_works(documents, tmp_path):
    tokenizer = SentencePieceTokenizer.train(documents, 320, str(tmp_path), model_type="unigram")
    assert tokenizer.vocab_size == 320
    assert tokenizer.decode(tokenizer.encode(TRICKY_TEXT)) == TRICKY_TEXT


def test_sentencepiece_save_to_another_directory(sentencepiece_dir, tmp_path):
    tokenizer = load_tokenizer(sentencepiece_dir)
    tokenizer.save(str(tmp_path / "copy"))
    copy = load_tokenizer(str(tmp_path / "copy"))
    assert copy.encode(TRICKY_TEXT) == tokenizer.encode(TRICKY_TEXT)


def test_sentencepiece_vocab_too_large_names_vocab_size(documents, tmp_path):
    with pytest.raises(ValueError, match="vocab_size 20000 is too large for this corpus"):
        SentencePieceTokenizer.train(documents, 20000, str(tmp_path))


def test_sentencepiece_vocab_too_small_for_characters(tmp_path):
    # 256 bytes + unk + eos + newline + ~60 distinct characters > 300 pieces.
    text = ["".join(chr(c) for c in range(0x41, 0x7B)) + " déjà vu ×÷"] * 50
    with pytest.raises(ValueError, match="vocab_size 300 is too small for the characters"):
        SentencePieceTokenizer.train(text, 300, str(tmp_path), character_coverage=1.0)


@pytest.mark.parametrize("vocab_size", [0, 257, 299, 512.0])
def test_sentencepiece_vocab_too_small(documents, tmp_path, vocab_size):
    with pytest.raises(ValueError, match=">= 300") as error:
        SentencePieceTokenizer.train(documents, vocab_size, str(tmp_path))
    assert repr(vocab_size) in str(error.value)


def test_sentencepiece_rejects_unknown_model_type(documents, tmp_path):
    with pytest.raises(ValueError, match="model_type must be 'bpe' or 'unigram', got 'char'"):
        SentencePieceTokenizer.train(documents, 400, str(tmp_path), model_type="char")


def test_sentencepiece_trains_on_builtin_corpus(tmp_path):
    corpus = builtin_corpus()
    tokenizer = SentencePieceTokenizer.train(corpus, 1024, str(tmp_path))
    for document in corpus[:200]:
        assert tokenizer.decode(tokenizer.encode(document)) == document


# load_tokenizer errors -------------------------------------------------------------------


def test_load_tokenizer_missing_directory(tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_load_tokenizer_corrupt_manifest(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("manifest", [{"type": "wordpiece"}, {}, ["byte"]])
def test_load_tokenizer_unknown_type(tmp_path, manifest):
    (tmp_path / "tokenizer.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(ValueError, match="expected one of \\['byte', 'sentencepiece'\\]"):
        load_tokenizer(str(tmp_path))


def test_load_tokenizer_corrupt_model_file(sentencepiece_dir, tmp_path):
    load_tokenizer(sentencepiece_dir).save(str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"definitely not a protobuf \x00\x01\x02")
    with pytest.raises(ValueError, match="is not a valid SentencePiece model"):
        load_tokenizer(str(tmp_path))


def test_load_tokenizer_missing_model_file(sentencepiece_dir, tmp_path):
    load_tokenizer(sentencepiece_dir).save(str(tmp_path))
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(str(tmp_path))


# make_tokenizer ----------------------------------------------------------------------------


def test_make_tokenizer_byte(tmp_path):
    tokenizer = make_tokenizer("byte", [], None, str(tmp_path))
    assert isinstance(tokenizer, ByteTokenizer)
    assert isinstance(load_tokenizer(str(tmp_path)), ByteTokenizer)
    with pytest.raises(ValueError, match="None or 257 for the byte tokenizer"):
        make_tokenizer("byte", [], 4096, str(tmp_path))


def test_make_tokenizer_sentencepiece(documents, tmp_path):
    tokenizer = make_tokenizer("sentencepiece", documents, 350, str(tmp_path))
    assert tokenizer.vocab_size == 350
    assert load_tokenizer(str(tmp_path)).encode(TRICKY_TEXT) == tokenizer.encode(TRICKY_TEXT)
    with pytest.raises(ValueError, match="got None"):
        make_tokenizer("sentencepiece", documents, None, str(tmp_path))


def test_make_tokenizer_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="tokenizer kind 'wordpiece' is not recognised") as error:
        make_tokenizer("wordpiece", [], 1000, str(tmp_path))
    assert "sentencepiece" in str(error.value)
