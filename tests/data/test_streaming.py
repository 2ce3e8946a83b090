"""Streamed `text:` corpora: token shards on disk, the `tf.data` reader over them, exact
resume (also in a fresh process), coverage, the cache and its errors."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from toex_tf.config import DataConfig
from toex_tf.data.prepared import prepare_data
from toex_tf.data.streaming import (
    build_token_shards,
    iter_text_documents,
    open_document_stream,
    split_stream,
)
from toex_tf.data.token_stream import encode_documents, lm_windows
from toex_tf.data.tokenizers import ByteTokenizer, write_manifest

tf_pipeline = pytest.importorskip("toex_tf.data.tf_pipeline")

SEQ_LEN = 8


def write_files(directory, count=12):
    """`count` files; file `i` is letter `i` repeated (so a window names its file)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (directory / f"f{i:02d}.txt").write_text(chr(ord("a") + i) * (40 + 9 * i) + "\n")
    return f"text:{directory}/*.txt"


def build(tmp_path, dataset, tokenizer=None, **kwargs):
    """Shards of 64 ids, so the small corpus spans many files."""
    source = open_document_stream(dataset)
    options = {"validation_fraction": 0.25, "seed": 0, "shard_tokens": 64, **kwargs}
    return build_token_shards(source, tokenizer or ByteTokenizer(), tmp_path / "cache", **options)


def text(ids):
    """Byte-tokenizer ids as text, eos dropped."""
    return ByteTokenizer().decode(ids)


def batches(dataset, count):
    return [np.concatenate([x.numpy(), y.numpy()[:, -1:]], 1) for x, y in dataset.take(count)]


def train_dataset(corpus, skip_batches=0, seed=0, batch_size=4, repeat=True):
    return tf_pipeline.make_shard_dataset(
        corpus.splits["train"], SEQ_LEN, batch_size, True, seed, repeat, skip_batches
    )


def test_skip_batches_resumes_exactly_within_and_across_epochs(tmp_path):
    corpus = build(tmp_path, write_files(tmp_path / "c"))
    per_epoch = corpus.splits["train"].num_windows(SEQ_LEN) // 4
    uninterrupted = batches(train_dataset(corpus), 3 * per_epoch + 4)
    for skip in (1, per_epoch - 1, per_epoch, per_epoch + 3, 3 * per_epoch):
        resumed = batches(train_dataset(corpus, skip_batches=skip), 4)
        np.testing.assert_array_equal(resumed, uninterrupted[skip : skip + 4], f"skip {skip}")


def test_every_window_once_per_epoch_in_a_new_order(tmp_path):
    corpus = build(tmp_path, write_files(tmp_path / "c"))
    train_docs = [
        doc
        for split, doc in split_stream(
            open_document_stream(f"text:{tmp_path}/c/*.txt").read(), 0.25, 0
        )
        if split == "train"
    ]
    inputs, targets = lm_windows(encode_documents(train_docs, ByteTokenizer()), SEQ_LEN)
    expected = sorted(map(tuple, np.concatenate([inputs, targets[:, -1:]], 1)))

    def epoch(seed, number):
        dataset = train_dataset(corpus, seed=seed, batch_size=1)
        windows = np.concatenate(batches(dataset, (number + 1) * len(expected)))
        return windows[number * len(expected) : (number + 1) * len(expected)]

    first = epoch(0, 0)
    assert sorted(map(tuple, first)) == expected
    assert sorted(map(tuple, epoch(0, 1))) == expected
    assert not np.array_equal(first, epoch(0, 1)) and not np.array_equal(first, epoch(1, 0))
    # Without shuffling, one epoch is exactly the in-memory windows, in order.
    ordered = tf_pipeline.make_shard_dataset(corpus.splits["train"], SEQ_LEN, 5, False, 0, False)
    ordered = np.concatenate(batches(ordered, 10**4))
    np.testing.assert_array_equal(ordered[:, :-1], inputs[: len(ordered)])


def test_files_are_interleaved_and_no_document_is_in_both_splits(tmp_path):
    corpus = build(tmp_path, write_files(tmp_path / "c"))
    letters = {
        name: set(text(shards.read(0, shards.num_tokens))) - {"\n"}
        for name, shards in corpus.splits.items()
    }
    assert letters["train"] and letters["validation"]
    assert not letters["train"] & letters["validation"]
    assert sum(corpus.documents.values()) == 12
    first_batch = batches(train_dataset(corpus, batch_size=8), 1)[0]
    assert len(set(text(first_batch[:, 0])) - {"\n"}) >= 3


def test_reader_reads_one_window_at_a_time(tmp_path, monkeypatch):
    corpus = build(tmp_path, write_files(tmp_path / "c"), shard_tokens=1 << 20)
    assert len(corpus.splits["train"].paths) == 1  # one shard holds the whole split
    reads = []
    pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: reads.append(n) or pread(fd, n, offset))
    batches(train_dataset(corpus), 5)
    assert len(reads) >= 5 * 4 and set(reads) == {(SEQ_LEN + 1) * 2}  # uint16 ids


def test_restart_in_a_fresh_process_reuses_the_cache_and_the_batches(tmp_path):
    data = DataConfig(dataset=write_files(tmp_path / "c"), tokenizer="byte")
    out = tmp_path / "out"
    prepared = prepare_data(data, SEQ_LEN, str(out))
    assert not prepared.shards.reused and prepared.train_dataset is not None
    skip = prepared.shards.splits["train"].num_windows(SEQ_LEN) // 4 + 2  # past an epoch
    expected = batches(prepared.train_dataset(4, 7, 0), skip + 10)[skip:]
    assert prepared.token_counts.sum() == prepared.shards.splits["train"].num_tokens
    mtimes = {path: os.stat(path).st_mtime_ns for path in (out / "data").iterdir()}
    script = textwrap.dedent(f"""
        import numpy as np
        from toex_tf.config import DataConfig
        from toex_tf.data.prepared import prepare_data
        prepared = prepare_data(DataConfig(dataset={data.dataset!r}, tokenizer="byte"),
                                {SEQ_LEN}, {str(out)!r})
        assert prepared.shards.reused
        got = [np.concatenate([x, y[:, -1:]], 1) for x, y in
               prepared.train_dataset(4, 7, {skip}).take(10).as_numpy_iterator()]
        np.save({str(tmp_path / "resumed.npy")!r}, np.stack(got))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "resumed.npy"), np.stack(expected))
    assert {path: os.stat(path).st_mtime_ns for path in (out / "data").iterdir()} == mtimes


class RenamedByteTokenizer(ByteTokenizer):
    """The byte tokenizer under another manifest: a different tokenizer to the cache."""

    def save(self, directory):
        return write_manifest(directory, {"type": "byte", "renamed": True})


def test_cache_is_reused_until_the_source_or_tokenizer_changes(tmp_path):
    dataset = write_files(tmp_path / "c")
    assert not build(tmp_path, dataset).reused
    assert build(tmp_path, dataset).reused
    assert not build(tmp_path, dataset, RenamedByteTokenizer()).reused
    assert build(tmp_path, dataset, RenamedByteTokenizer()).reused
    (tmp_path / "c" / "f03.txt").write_text("changed text\n")
    rebuilt = build(tmp_path, dataset, RenamedByteTokenizer())
    assert not rebuilt.reused
    assert "changed text" in "".join(text(s.read(0, s.num_tokens)) for s in rebuilt.splits.values())
    assert not build(tmp_path, dataset, validation_fraction=0.5).reused


def test_damaged_cache_names_the_file(tmp_path):
    dataset = write_files(tmp_path / "c")
    shard = build(tmp_path, dataset).splits["train"].paths[2]
    with open(shard, "r+b") as file:
        file.truncate(10)
    with pytest.raises(ValueError, match=f"token shard '{shard}' holds 10 bytes"):
        build(tmp_path, dataset)
    manifest = tmp_path / "cache" / "manifest.json"
    manifest.write_text(manifest.read_text()[:-20])
    with pytest.raises(ValueError, match="manifest.json' is corrupt"):
        build(tmp_path, dataset)


def test_bad_corpora_and_settings_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="matched no files"):
        open_document_stream(f"text:{tmp_path}/nothing/*.txt")
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("a single document\n")
    (one / "b.txt").write_text("  \n")
    with pytest.raises(
        ValueError, match="validation_fraction=0.25 needs at least 2 documents.*has 1"
    ):
        build(tmp_path, f"text:{one}/*.txt")
    (one / "a.txt").write_text("\n")
    with pytest.raises(ValueError, match="gave an empty corpus"):
        build(tmp_path, f"text:{one}/*.txt")
    with pytest.raises(ValueError, match="'uint8' cannot hold the ids of a 257-id vocabulary"):
        build(tmp_path, write_files(tmp_path / "c"), dtype="uint8")
    with pytest.raises(ValueError, match="validation_fraction must be strictly between"):
        list(split_stream(["a", "b"], 1.0))


def test_split_keeps_one_document_on_each_side():
    for count in (2, 3, 5):
        for fraction in (0.01, 0.99):
            splits = [split for split, _ in split_stream(map(str, range(count)), fraction)]
            assert len(splits) == count and set(splits) == {"train", "validation"}


def test_long_files_are_cut_into_bounded_documents(tmp_path):
    paragraphs = [f"paragraph {i} " * 5 + "\n" for i in range(40)]
    (tmp_path / "long.txt").write_text("\n".join(paragraphs))
    (tmp_path / "short.txt").write_text("one short document\n\nof two paragraphs\n")
    (tmp_path / "line.txt").write_text("x" * 1000)
    long_docs = list(iter_text_documents([str(tmp_path / "long.txt")], max_document_chars=200))
    assert "".join(long_docs) == "\n".join(paragraphs) and len(long_docs) > 5
    assert all(len(doc) < 400 and doc.endswith("\n\n") for doc in long_docs[:-1])
    short = list(iter_text_documents([str(tmp_path / "short.txt")], max_document_chars=200))
    assert short == ["one short document\n\nof two paragraphs\n"]
    line = list(iter_text_documents([str(tmp_path / "line.txt")], max_document_chars=200))
    assert "".join(line) == "x" * 1000 and max(map(len, line)) <= 400


def test_prepared_heads_and_held_out_prompts_come_from_the_shards(tmp_path):
    from toex_tf.data.prepared import held_out_prompts

    data = DataConfig(dataset=write_files(tmp_path / "c", 30), tokenizer="byte")
    prepared = prepare_data(data, SEQ_LEN, str(tmp_path / "out"), head_windows=5)
    train, validation = prepared.shards.splits["train"], prepared.shards.splits["validation"]
    assert prepared.train_inputs.shape == (5, SEQ_LEN)
    np.testing.assert_array_equal(prepared.train_inputs, train.windows(SEQ_LEN, 5)[0])
    assert len(prepared.val_inputs) == min(5, validation.num_windows(SEQ_LEN))
    prompts = held_out_prompts(data, prepared.tokenizer, 3, 4)
    cached = held_out_prompts(data, prepared.tokenizer, 3, 4, cache_dir=prepared.shards.directory)
    np.testing.assert_array_equal(prompts, cached)
    assert set(text(prompts.ravel())) <= set(text(validation.read(0, validation.num_tokens)))
    assert json.loads((tmp_path / "out" / "data" / "manifest.json").read_text())["key"]["seed"] == 0


def test_tfds_dataset_streams_without_a_list_of_documents(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    tfds.disable_progress_bar()

    class ToexStreamText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict({"text": tfds.features.Text()})
            return tfds.core.DatasetInfo(builder=self, features=features)

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(20):
                yield i, {"text": " " if i == 3 else f"document {i} é " * 5}

    ToexStreamText(data_dir=str(tmp_path / "tfds")).download_and_prepare()
    dataset = "tfds:toex_stream_text"
    data = DataConfig(dataset=dataset, data_dir=str(tmp_path / "tfds"), tokenizer="byte")
    prepared = prepare_data(data, SEQ_LEN, str(tmp_path / "out"))
    assert sum(prepared.shards.documents.values()) == 19  # the blank one is dropped
    stream = open_document_stream(dataset, data_dir=str(tmp_path / "tfds"))
    assert sorted(stream.read()) == sorted(f"document {i} é " * 5 for i in range(20) if i != 3)
    assert batches(prepared.train_dataset(2, 0, 0), 1)[0].shape == (2, SEQ_LEN + 1)
