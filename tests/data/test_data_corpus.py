"""Tests for toex_tf.data.corpus: built-in corpus, text globs, dataset specs, splits."""

import os
import subprocess
import sys

import pytest

from toex_tf.data.corpus import (
    builtin_corpus,
    load_documents,
    read_text_files,
    split_documents,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# Built-in corpus -------------------------------------------------------------------------


def test_builtin_corpus_is_deterministic_and_a_fresh_copy():
    first = builtin_corpus()
    second = builtin_corpus()
    assert first == second
    first.clear()  # Mutating the returned list must not touch the cache.
    assert builtin_corpus() == second


def test_builtin_corpus_size_is_sane():
    documents = builtin_corpus()
    num_chars = sum(len(document) for document in documents)
    # CPython 3.11 gives ~7 k documents and ~2.1 M characters; allow for other versions.
    assert 2_000 < len(documents) < 100_000
    assert 500_000 < num_chars < 20_000_000


def test_builtin_corpus_documents_are_clean_and_unique():
    documents = builtin_corpus()
    assert len(set(documents)) == len(documents)
    assert min(len(document) for document in documents) >= 40
    for document in documents:
        assert document == document.strip()
        assert "  " not in document
        assert "\n\n\n" not in document


def test_builtin_corpus_is_mostly_english_text():
    text = "".join(builtin_corpus())
    non_space = [char for char in text if not char.isspace()]
    letters = sum(char.isascii() and char.isalpha() for char in non_space)
    assert letters / len(non_space) > 0.7
    words = text.lower().split()
    assert words.count("the") / len(words) > 0.02


def test_builtin_corpus_contains_known_stdlib_docstrings():
    documents = builtin_corpus()
    # abc.py's module docstring and json's package docstring.
    assert any(document.startswith("Abstract Base Classes (ABCs)") for document in documents)
    assert any("JSON (JavaScript Object Notation)" in document for document in documents)


def test_builtin_corpus_skips_test_suites():
    # The module docstring of Lib/test/support/__init__.py; "regrtest" (the test runner)
    # is named only in docstrings under Lib/test.
    documents = builtin_corpus()
    assert "Supporting definitions for the Python regression tests." not in documents
    assert not any("regrtest" in document for document in documents)


# Text files ------------------------------------------------------------------------------


@pytest.fixture
def text_tree(tmp_path):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha document\n\nsecond paragraph", encoding="utf-8")
    (tmp_path / "sub" / "b.txt").write_text("beta document", encoding="utf-8")
    (tmp_path / "sub" / "deep" / "c.txt").write_text("gamma é document", encoding="utf-8")
    (tmp_path / "notes.md").write_text("markdown, not text", encoding="utf-8")
    return tmp_path


def test_read_text_files_plain_glob(text_tree):
    assert read_text_files(str(text_tree / "*.txt")) == ["alpha document\n\nsecond paragraph"]


def test_read_text_files_recursive_glob(text_tree):
    documents = read_text_files(str(text_tree / "**" / "*.txt"))
    # Sorted by path: a.txt, sub/b.txt, sub/deep/c.txt.
    assert documents == [
        "alpha document\n\nsecond paragraph",
        "beta document",
        "gamma é document",
    ]


def test_read_text_files_directory_means_all_txt_files(text_tree):
    documents = read_text_files(str(text_tree))
    assert len(documents) == 3
    assert "markdown, not text" not in documents


def test_read_text_files_replaces_invalid_utf8(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe bytes")
    assert read_text_files(str(tmp_path / "bad.txt")) == ["ok \ufffd\ufffd bytes"]


def test_read_text_files_no_match_names_the_glob(tmp_path):
    pattern = str(tmp_path / "missing" / "*.txt")
    with pytest.raises(ValueError, match="matched no files") as error:
        read_text_files(pattern)
    assert repr(pattern) in str(error.value)


# load_documents --------------------------------------------------------------------------


def test_load_documents_builtin():
    assert load_documents("builtin") == builtin_corpus()


def test_load_documents_text_glob_drops_blank_documents(text_tree):
    (text_tree / "blank.txt").write_text("  \n\n ", encoding="utf-8")
    documents = load_documents(f"text:{text_tree}")
    assert len(documents) == 3
    assert all(document.strip() for document in documents)


def test_load_documents_empty_corpus_raises(tmp_path_factory):
    # A folder whose path does not hold the word, so the match is on the message itself
    # (this test's own tmp_path is named after it and would echo "empty").
    folder = tmp_path_factory.mktemp("blank_docs")
    (folder / "nothing.txt").write_text("", encoding="utf-8")
    (folder / "spaces.txt").write_text(" \n\t\n", encoding="utf-8")
    spec = f"text:{folder}/*.txt"
    assert "empty" not in spec
    with pytest.raises(ValueError, match="gave an empty corpus") as error:
        load_documents(spec)
    assert repr(spec) in str(error.value)


@pytest.mark.parametrize("spec", ["wikipedia", "", "text:", "tfds:", "TEXT:a.txt", "builtin "])
def test_load_documents_bad_spec_names_the_value(spec):
    with pytest.raises(ValueError, match="not recognised") as error:
        load_documents(spec)
    assert repr(spec) in str(error.value)
    assert "tfds:NAME" in str(error.value)


def test_load_documents_rejects_non_string():
    with pytest.raises(TypeError, match="dataset must be a str"):
        load_documents(["builtin"])


def test_package_imports_without_tensorflow():
    # Block TensorFlow and TFDS: `import toex_tf.data` and the pure-Python paths must work.
    code = (
        "import sys\n"
        "sys.modules['tensorflow'] = None\n"
        "sys.modules['tensorflow_datasets'] = None\n"
        "import toex_tf.data as data\n"
        "tokenizer = data.ByteTokenizer()\n"
        "stream = data.encode_documents(['hi'], tokenizer)\n"
        "assert stream.tolist() == [104, 105, 256], stream\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


# TFDS (offline) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    tfds.disable_progress_bar()
    return tfds


@pytest.fixture(scope="module")
def prepared_tfds_dir(tfds, tmp_path_factory):
    """A tiny TFDS dataset, prepared locally (no download), with a `text` feature."""
    import tensorflow as tf

    class ToexTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "label": tf.int64})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(5):
                yield i, {"text": f"document number {i} é", "label": i}

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    ToexTinyText(data_dir=data_dir).download_and_prepare()
    return data_dir


def test_load_documents_tfds_prepared(prepared_tfds_dir):
    documents = load_documents("tfds:toex_tiny_text", data_dir=prepared_tfds_dir)
    assert sorted(documents) == [f"document number {i} é" for i in range(5)]
    # Same order on every load (TFDS shuffles deterministically when preparing).
    assert load_documents("tfds:toex_tiny_text", data_dir=prepared_tfds_dir) == documents


def test_load_documents_tfds_unknown_text_key(prepared_tfds_dir):
    with pytest.raises(ValueError, match="'body' is not a feature") as error:
        load_documents("tfds:toex_tiny_text", data_dir=prepared_tfds_dir, tfds_text_key="body")
    assert "['label', 'text']" in str(error.value)


def test_load_documents_tfds_unknown_name(tfds, tmp_path):
    with pytest.raises(ValueError, match="could not load TFDS dataset 'no_such_dataset_xyz'") as (
        error
    ):
        load_documents("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))
    assert str(tmp_path) in str(error.value)
    assert len(str(error.value)) < 1000  # Not the list of every TFDS dataset.


def test_load_documents_tfds_unprepared_points_at_data_dir(tfds, tmp_path):
    # A registered dataset that is not prepared in an empty data_dir: with download=False
    # this fails at once, without trying the network.
    with pytest.raises(ValueError, match="--data_dir") as error:
        load_documents("tfds:imdb_reviews", data_dir=str(tmp_path))
    assert "'imdb_reviews'" in str(error.value)
    assert str(tmp_path) in str(error.value)


# split_documents -------------------------------------------------------------------------


def test_split_documents_is_a_deterministic_disjoint_partition():
    documents = [f"document {i}" for i in range(100)]
    train, validation = split_documents(documents, validation_fraction=0.1, seed=3)
    assert (len(train), len(validation)) == (90, 10)
    assert set(train).isdisjoint(validation)
    assert sorted(train + validation) == sorted(documents)
    assert split_documents(documents, validation_fraction=0.1, seed=3) == (train, validation)
    assert split_documents(documents, validation_fraction=0.1, seed=4) != (train, validation)
    assert documents == [f"document {i}" for i in range(100)]  # Input left untouched.


@pytest.mark.parametrize(
    "num_documents, fraction, expected",
    [(2, 0.1, (1, 1)), (2, 0.9, (1, 1)), (10, 0.01, (9, 1)), (10, 0.99, (1, 9)), (10, 0.3, (7, 3))],
)
def test_split_documents_keeps_at_least_one_document_each_side(num_documents, fraction, expected):
    train, validation = split_documents([str(i) for i in range(num_documents)], fraction)
    assert (len(train), len(validation)) == expected


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_documents_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="validation_fraction") as error:
        split_documents(["a", "b", "c"], validation_fraction=fraction)
    assert repr(fraction) in str(error.value)


def test_split_documents_needs_two_documents():
    with pytest.raises(ValueError, match="at least 2 documents to split, got 1"):
        split_documents(["only"])
