"""A corpus made ready for a run: split, tokenizer trained (or reloaded), LM windows.

The built-in corpus (2 MB) is held in memory. `text:` and `tfds:` datasets are streamed
(`toex_tf.data.streaming`): tokenized once into shards under a cache directory, read back
by `tf.data` a batch at a time; only bounded heads of their windows are arrays.
"""

import functools
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from toex_tf.config import DataConfig
from toex_tf.data.corpus import load_documents, split_documents
from toex_tf.data.streaming import (
    ShardedCorpus,
    TokenShards,
    build_token_shards,
    is_streamed,
    open_document_stream,
    split_stream,
)
from toex_tf.data.token_stream import encode_documents, lm_windows, token_frequencies
from toex_tf.data.tokenizers import make_tokenizer, run_tokenizer

# Windows of each split kept as arrays for a streamed corpus: `train_inputs[:n]` and
# `val_inputs[:n]` serve evaluation, gates, calibration and exit-head caching (the CLI's
# largest default reads are 512 gate windows and 32 k cached tokens). 4096 windows at
# seq_len 256 are 8 MB per split.
DEFAULT_HEAD_WINDOWS = 4096
# SentencePiece trains on at most this many characters of a streamed corpus's training
# documents, the first ones in order: training time and memory grow with it (a 4096-piece
# BPE model on 32 M characters: 6 s and 160 MB peak), what it learns barely does.
TOKENIZER_SAMPLE_CHARS = 1 << 25


@dataclass
class PreparedData:
    """The splits as LM windows, the tokenizer and the training token counts.

    For a streamed corpus, `train_*` and `val_*` are the first `head_windows` windows of
    each split, `train_dataset(batch_size, seed, skip_batches)` gives the whole training
    split as a repeating, exactly resumable `tf.data.Dataset` (`make_shard_dataset`), and
    `shards` the token shards. Both are None for the in-memory built-in corpus.
    `token_counts` always counts the whole training split.
    """

    tokenizer: object
    train_inputs: np.ndarray
    train_targets: np.ndarray
    val_inputs: np.ndarray
    val_targets: np.ndarray
    token_counts: np.ndarray
    train_dataset: Callable | None = None
    shards: ShardedCorpus | None = None


def prepare_data(
    data: DataConfig,
    seq_len: int,
    output_dir: str,
    seed: int = 0,
    tokenizer=None,
    cache_dir: str | None = None,
    head_windows: int = DEFAULT_HEAD_WINDOWS,
) -> PreparedData:
    """Loads and splits the corpus, trains (or reloads) the tokenizer, cuts LM windows.

    Args:
        data: where the text comes from and how it is tokenized.
        seq_len: int, the window length.
        output_dir: the run directory; the tokenizer is kept in `output_dir/tokenizer`.
        seed: int, the split's seed.
        tokenizer: None, or the tokenizer to use (a loaded model's); it is saved to
            `output_dir/tokenizer` when that holds none. None: the one there, else one
            trained on the training split only and saved there, so a later run (resume,
            eval) reloads it and ids never shift. On a streamed corpus it trains on the
            first `TOKENIZER_SAMPLE_CHARS` characters of training documents.
        cache_dir: str or None, where a streamed corpus's token shards go (reused when
            source, tokenizer and split are unchanged). None: `output_dir/data`. A
            non-chief worker of a multi-worker run passes a directory of its own.
        head_windows: int, windows of each split kept as arrays for a streamed corpus.
    """
    if not isinstance(head_windows, int) or head_windows < 1:
        raise ValueError(f"head_windows must be a positive int, got {head_windows!r}.")
    if is_streamed(data.dataset):
        cache_dir = cache_dir or os.path.join(output_dir, "data")
        return _prepare_streamed(
            data, seq_len, output_dir, seed, tokenizer, cache_dir, head_windows
        )
    from toex_tf.progress import Progress  # noqa: PLC0415

    progress = Progress(4, "data")
    documents = load_documents(
        data.dataset, data_dir=data.data_dir, tfds_text_key=data.tfds_text_key
    )
    progress.update(1, f"{len(documents)} documents read")
    train_docs, val_docs = split_documents(documents, data.validation_fraction, seed=seed)
    tokenizer = _ready_tokenizer(data, output_dir, tokenizer, lambda: train_docs)
    progress.update(2, "tokenizer ready")
    train_stream = encode_documents(train_docs, tokenizer)
    progress.update(3, "training split encoded")
    val_stream = encode_documents(val_docs, tokenizer)
    progress.update(4, "held-out split encoded")
    train_inputs, train_targets = lm_windows(train_stream, seq_len)
    val_inputs, val_targets = lm_windows(val_stream, seq_len)
    print(
        f"Data: {len(train_docs)} train / {len(val_docs)} held-out documents, "
        f"{len(train_stream)} / {len(val_stream)} tokens, vocab {tokenizer.vocab_size}."
    )
    return PreparedData(
        tokenizer=tokenizer,
        train_inputs=train_inputs,
        train_targets=train_targets,
        val_inputs=val_inputs,
        val_targets=val_targets,
        token_counts=token_frequencies(train_stream, tokenizer.vocab_size),
    )


def _ready_tokenizer(data: DataConfig, output_dir: str, tokenizer, training_documents):
    """`tokenizer` (saved to `output_dir/tokenizer` if none is there), else the one there,
    else one made from `training_documents()` and saved there."""
    vocab_size = data.vocab_size if data.tokenizer == "sentencepiece" else None
    return run_tokenizer(
        output_dir,
        tokenizer,
        lambda directory: make_tokenizer(
            data.tokenizer, training_documents(), vocab_size, directory
        ),
    )


def _training_sample(documents: Iterable[tuple[str, str]], max_chars: int):
    """The training documents of a `split_stream`, until `max_chars` characters."""
    chars = 0
    for split, document in documents:
        if chars >= max_chars:
            return
        if split == "train":
            chars += len(document)
            yield document


def _prepare_streamed(data, seq_len, output_dir, seed, tokenizer, cache_dir, head_windows):
    from toex_tf.progress import Progress  # noqa: PLC0415

    progress = Progress(4, "data")
    source = open_document_stream(
        data.dataset, data_dir=data.data_dir, tfds_text_key=data.tfds_text_key
    )
    progress.update(1, f"streaming {source.description}")
    tokenizer = _ready_tokenizer(
        data,
        output_dir,
        tokenizer,
        lambda: _training_sample(
            split_stream(source.read(), data.validation_fraction, seed, source.dataset),
            TOKENIZER_SAMPLE_CHARS,
        ),
    )
    progress.update(2, "tokenizer ready")
    corpus = build_token_shards(
        source,
        tokenizer,
        cache_dir,
        data.validation_fraction,
        seed,
        on_progress=_tokenizing_progress(source.size_bytes),
    )
    progress.update(3, f"token shards {'reused' if corpus.reused else 'written'}: {cache_dir}")
    train, validation = corpus.splits["train"], corpus.splits["validation"]
    train_inputs, train_targets = train.windows(seq_len, head_windows)
    val_inputs, val_targets = validation.windows(seq_len, head_windows)
    progress.update(4, f"first {head_windows} windows of each split read")
    print(
        f"Data: {corpus.documents['train']} train / {corpus.documents['validation']} held-out "
        f"documents, {train.num_tokens} / {validation.num_tokens} tokens, vocab "
        f"{tokenizer.vocab_size} (streamed from {cache_dir})."
    )
    return PreparedData(
        tokenizer=tokenizer,
        train_inputs=train_inputs,
        train_targets=train_targets,
        val_inputs=val_inputs,
        val_targets=val_targets,
        token_counts=corpus.token_counts,
        train_dataset=functools.partial(_shard_dataset, train, seq_len),
        shards=corpus,
    )


def _tokenizing_progress(size_bytes: int | None):
    """`build_token_shards`'s `on_progress` for text over 64 MB (tokenizing it takes
    minutes): MB read, shown from the first batch (so not when the shards are reused)."""
    if not size_bytes or size_bytes < 1 << 26:
        return None
    from toex_tf.progress import Progress  # noqa: PLC0415

    megabytes = round(size_bytes / 1e6)
    progress = []

    def update(chars: int, finished: bool) -> None:
        if not progress:
            progress.append(Progress(megabytes, "tokenizing"))
        # Characters against bytes: close for mostly ASCII text, never past the end.
        progress[0].update(megabytes if finished else min(chars // 10**6, megabytes - 1), "MB")

    return update


def _shard_dataset(
    shards: TokenShards, seq_len: int, batch_size: int, seed: int, skip_batches: int
):
    """`PreparedData.train_dataset`: the training split, shuffled and repeating."""
    from toex_tf.data.tf_pipeline import make_shard_dataset  # noqa: PLC0415 - TensorFlow

    return make_shard_dataset(
        shards, seq_len, batch_size, shuffle=True, seed=seed, repeat=True, skip_batches=skip_batches
    )


def held_out_prompts(
    data: DataConfig,
    tokenizer,
    count: int,
    length: int,
    seed: int = 0,
    cache_dir: str | None = None,
) -> np.ndarray:
    """`count` prompts of `length` tokens, evenly spaced over the held-out split.

    The split is `prepare_data`'s (same documents, fraction and seed), so no prompt comes
    from training text; `tokenizer` must be the model's. A streamed corpus's held-out
    shards are read from `cache_dir` (built there if missing, `prepare_data`'s
    `output_dir/data`), or with None encoded into a temporary directory.

    Returns:
        int32 `(count, length)`.
    """
    if tokenizer is None:
        raise ValueError("held-out prompts need the model's tokenizer; the model has none.")
    if not is_streamed(data.dataset):
        documents = load_documents(
            data.dataset, data_dir=data.data_dir, tfds_text_key=data.tfds_text_key
        )
        _, held_out = split_documents(documents, data.validation_fraction, seed=seed)
        stream = encode_documents(held_out, tokenizer)
        return _evenly_spaced(lambda s, n: stream[s : s + n], len(stream), count, length)
    source = open_document_stream(
        data.dataset, data_dir=data.data_dir, tfds_text_key=data.tfds_text_key
    )
    with tempfile.TemporaryDirectory() as scratch:
        splits = ("validation",) if cache_dir is None else ("train", "validation")
        corpus = build_token_shards(
            source, tokenizer, cache_dir or scratch, data.validation_fraction, seed, splits=splits
        )
        held_out = corpus.splits["validation"]
        return _evenly_spaced(held_out.read, held_out.num_tokens, count, length)


def _evenly_spaced(read, num_tokens: int, count: int, length: int) -> np.ndarray:
    """`count` slices `read(start, length)` with starts evenly spaced over the stream."""
    if num_tokens <= length:
        raise ValueError(
            f"the held-out split has {num_tokens} tokens; prompt_length={length} needs more. "
            "Use a shorter prompt or a larger validation_fraction."
        )
    starts = np.linspace(0, num_tokens - length - 1, count).astype(int)
    return np.stack([read(int(s), length) for s in starts]).astype("int32")
