"""Streamed corpora: documents read one at a time, split by a hash, tokenized once into
token shards on disk, and read back a window at a time.

`text:` and `tfds:` datasets take this path (`toex_tf.data.prepared.prepare_data`), so no
step holds the whole corpus in memory. The documents and their split come from
`toex_tf.data.document_stream` (re-exported here); the `tf.data` reader over the shards is
`toex_tf.data.tf_pipeline.make_shard_dataset`. Pure Python and NumPy.

A cache directory (by default `OUTPUT_DIR/data`) holds:

    train-00000.bin, ...        the training stream: raw little-endian ids (the manifest's
    validation-00000.bin, ...   `dtype`), `shard_tokens` ids per file but the last
    train_token_counts.npy      int64 `(vocab_size,)`: each id's count in the training split
    manifest.json               written last and atomically: what was built, from what

A manifest whose `key` (source, tokenizer, split and shard settings) matches is reused
without tokenizing again, so a restarted run reads exactly the same ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from toex_tf.data.document_stream import (  # noqa: F401 - re-exported
    MAX_DOCUMENT_CHARS,
    STREAMED_PREFIXES,
    DocumentStream,
    is_streamed,
    iter_text_documents,
    open_document_stream,
    split_stream,
)

SPLITS = ("train", "validation")
MANIFEST_FILE = "manifest.json"
TOKEN_COUNTS_FILE = "train_token_counts.npy"
FORMAT = "toex_tf.token_shards/1"

# 8 M ids per shard file (16 MB as uint16): a 1 GB corpus makes tens of files, and a group
# of 8 shards' window indices (`make_shard_dataset`) stays a few MB at seq_len 256.
DEFAULT_SHARD_TOKENS = 1 << 23
# Documents are encoded in batches of at most this many documents and characters.
_ENCODE_DOCUMENTS = 1000
_ENCODE_CHARS = 1 << 23


def token_dtype(vocab_size: int, dtype: str | None = None) -> str:
    """The shards' id type: `dtype`, or the smallest of uint16 and uint32 that fits.

    Raises:
        ValueError: if `dtype` is not an unsigned integer type that holds `vocab_size - 1`.
    """
    name = dtype or ("uint16" if vocab_size <= 1 << 16 else "uint32")
    np_dtype = np.dtype(name)
    if np_dtype.kind != "u" or np.iinfo(np_dtype).max < vocab_size - 1:
        raise ValueError(
            f"shard dtype {name!r} cannot hold the ids of a {vocab_size}-id vocabulary (up "
            f"to {vocab_size - 1}); expected 'uint16' (vocabularies up to 65536) or 'uint32'."
        )
    return np_dtype.name


class TokenShards:
    """One split's token stream, stored as consecutive raw shard files.

    Args:
        paths: sequence of str, the shard files in stream order.
        counts: sequence of int, the ids in each file (each at least 1).
        dtype: str, the files' unsigned id type (little-endian).
        check: bool, defaults to True. Whether to check every file's size now.

    Raises:
        ValueError: if a file is missing or its size disagrees with its count.
    """

    def __init__(self, paths: Sequence[str], counts: Sequence[int], dtype: str, check=True):
        self.paths, self.counts = tuple(paths), tuple(int(c) for c in counts)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        for path, count in zip(self.paths, self.counts) if check else ():
            expected = count * self.dtype.itemsize
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size != expected:
                raise ValueError(
                    f"token shard {path!r} holds {size} bytes (None: missing); its manifest "
                    f"says {count} ids of {self.dtype.name} ({expected} bytes). The cache is "
                    f"damaged: delete {os.path.dirname(path)!r} to rebuild it."
                )

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def num_windows(self, seq_len: int) -> int:
        """Windows of `lm_windows(stream, seq_len)`: `(num_tokens - 1) // seq_len`."""
        return max(self.num_tokens - 1, 0) // seq_len

    def shard_windows(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """`(first, count)` int64 per shard: the windows whose first id is in the shard."""
        num_windows = self.num_windows(seq_len)
        bounds = np.minimum(-(-self.offsets // seq_len), num_windows)  # ceil, then clip
        return bounds[:-1], np.diff(bounds)

    def read(self, start: int, length: int) -> np.ndarray:
        """Ids `[start, start + length)` of the stream as int32, read with `os.pread` (a
        window at a shard boundary reads two files); never more than `length` ids."""
        if start < 0 or start + length > self.num_tokens:
            raise ValueError(
                f"ids [{start}, {start + length}) are outside the stream of {self.num_tokens}."
            )
        out = np.empty(length, np.int32)
        shard = int(np.searchsorted(self.offsets, start, "right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self.offsets[shard])
            take = min(length - done, self.counts[shard] - offset)
            size = self.dtype.itemsize
            descriptor = os.open(self.paths[shard], os.O_RDONLY)
            try:
                data = os.pread(descriptor, take * size, offset * size)
            finally:
                os.close(descriptor)
            if len(data) != take * size:
                raise ValueError(f"token shard {self.paths[shard]!r} is shorter than recorded.")
            out[done : done + take] = np.frombuffer(data, self.dtype)
            done, shard = done + take, shard + 1
        return out

    def read_windows(self, indices: np.ndarray, seq_len: int) -> np.ndarray:
        """int32 `(len(indices), seq_len + 1)`: window `i` is ids `[i * seq_len, (i + 1) *
        seq_len + 1)`, inputs then the last target."""
        rows = [self.read(int(i) * seq_len, seq_len + 1) for i in np.asarray(indices)]
        return np.stack(rows) if rows else np.zeros((0, seq_len + 1), np.int32)

    def windows(self, seq_len: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `count` windows (fewer if the stream is short) as `lm_windows` cuts
        them: `(inputs, targets)` int32 `(n, seq_len)`, read in one piece.

        Raises:
            ValueError: if the stream is shorter than `seq_len + 1` ids.
        """
        if self.num_windows(seq_len) == 0:
            raise ValueError(
                f"token_stream has {self.num_tokens} tokens; expected at least seq_len + 1 = "
                f"{seq_len + 1} to make one window."
            )
        count = min(count, self.num_windows(seq_len))
        used = self.read(0, count * seq_len + 1)
        return used[:-1].reshape(count, seq_len), used[1:].reshape(count, seq_len)


@dataclass
class ShardedCorpus:
    """What `build_token_shards` returns: the splits' shards and the training counts."""

    directory: str
    splits: dict[str, TokenShards]
    documents: dict[str, int]
    token_counts: np.ndarray
    reused: bool


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the files `tokenizer.save` writes (so two equal tokenizers agree)."""
    digest = hashlib.sha256()
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save(directory)
        for name in sorted(os.listdir(directory)):
            with open(os.path.join(directory, name), "rb") as file:
                digest.update(f"{name}\0".encode() + file.read() + b"\0")
    return digest.hexdigest()


class _ShardWriter:
    """Appends one split's ids to files of `shard_tokens` ids each."""

    def __init__(self, directory: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype = directory, split, dtype
        self.shard_tokens = shard_tokens
        self.files: list[str] = []
        self.counts: list[int] = []
        self._file = None

    def append(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype)
        while len(ids):
            if self._file is None or self.counts[-1] == self.shard_tokens:
                self._next_file()
            take = self.shard_tokens - self.counts[-1]
            self._file.write(ids[:take].tobytes())
            self.counts[-1] += len(ids[:take])
            ids = ids[take:]

    def _next_file(self) -> None:
        if self._file is not None:
            self._file.close()
        self.files.append(f"{self.split}-{len(self.files):05d}.bin")
        self._file = open(os.path.join(self.directory, self.files[-1]), "wb")
        self.counts.append(0)

    def close(self) -> list[dict]:
        if self._file is not None:
            self._file.close()
        return [{"file": name, "tokens": n} for name, n in zip(self.files, self.counts)]


def _read_manifest(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            manifest = json.load(file)
        manifest["key"], manifest["splits"]  # noqa: B018 - the fields every manifest has
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"token shard manifest {path!r} is corrupt ({type(error).__name__}: {error}); "
            f"delete {os.path.dirname(path)!r} to rebuild the shards."
        ) from error
    return manifest


def _open_corpus(directory: str, manifest: dict, vocab_size: int, reused: bool) -> ShardedCorpus:
    dtype = manifest["key"]["dtype"]
    splits = {
        name: TokenShards(
            [os.path.join(directory, shard["file"]) for shard in split["shards"]],
            [shard["tokens"] for shard in split["shards"]],
            dtype,
        )
        for name, split in manifest["splits"].items()
    }
    counts_path = os.path.join(directory, TOKEN_COUNTS_FILE)
    try:
        token_counts = np.load(counts_path, allow_pickle=False)
        if token_counts.shape != (vocab_size,):
            raise ValueError(f"shape {token_counts.shape}, expected ({vocab_size},)")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"token counts {counts_path!r} are unreadable ({error}); delete "
            f"{directory!r} to rebuild the shards."
        ) from error
    documents = {name: split["documents"] for name, split in manifest["splits"].items()}
    return ShardedCorpus(directory, splits, documents, token_counts, reused)


def build_token_shards(
    source: DocumentStream,
    tokenizer,
    cache_dir: str,
    validation_fraction: float = 0.1,
    seed: int = 0,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    dtype: str | None = None,
    splits: Sequence[str] = SPLITS,
    on_progress: Callable[[int, bool], None] | None = None,
) -> ShardedCorpus:
    """Tokenizes a streamed corpus into shards under `cache_dir`, or reuses them.

    Documents are split by `split_stream` and encoded `_ENCODE_DOCUMENTS` documents (or
    `_ENCODE_CHARS` characters) at a time, each followed by `tokenizer.eos_id` as in
    `encode_documents`, so memory is bounded by that batch and not by the corpus. The
    manifest is written last, atomically; one whose key (source fingerprint, tokenizer
    files' SHA-256, vocabulary, dtype, split settings, shard size, splits) matches is
    reused as is. Anything else in `cache_dir` named like a shard is replaced.

    Args:
        source: the documents (`open_document_stream`).
        tokenizer: any `toex_tf.data.tokenizers.Tokenizer`.
        cache_dir: str, created if needed.
        validation_fraction, seed: `split_stream`'s.
        shard_tokens: int, ids per shard file. Defaults to 8 M.
        dtype: str or None, the ids' type; None: uint16 when the vocabulary fits, else uint32.
        splits: the splits written (the others' documents are skipped, not encoded).
        on_progress: None, or called after each encoded batch with the characters read
            so far and whether all are encoded (never when the shards are reused).

    Returns:
        A `ShardedCorpus`.

    Raises:
        ValueError: from `split_stream`, `token_dtype`, or a damaged cache (naming the file).
    """
    vocab_size = tokenizer.vocab_size
    key = {
        "format": FORMAT,
        "source": source.fingerprint,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size, dtype),
        "validation_fraction": validation_fraction,
        "seed": seed,
        "shard_tokens": shard_tokens,
        "splits": list(splits),
    }
    key = json.loads(json.dumps(key))  # as it reads back from the file
    manifest_path = os.path.join(cache_dir, MANIFEST_FILE)
    manifest = _read_manifest(manifest_path)
    if manifest is not None and manifest["key"] == key:
        return _open_corpus(cache_dir, manifest, vocab_size, reused=True)
    os.makedirs(cache_dir, exist_ok=True)
    if manifest is not None:
        os.remove(manifest_path)  # a crash while rebuilding must not leave it pointing here
    for name in os.listdir(cache_dir):
        if name.endswith(".tmp") or (name.endswith(".bin") and name.split("-")[0] in SPLITS):
            os.remove(os.path.join(cache_dir, name))
    dtype = np.dtype(key["dtype"]).newbyteorder("<")
    writers = {name: _ShardWriter(cache_dir, name, dtype, shard_tokens) for name in splits}
    documents = dict.fromkeys(SPLITS, 0)
    token_counts = np.zeros(vocab_size, np.int64)
    batch: list[tuple[str, str]] = []
    chars = read = 0
    for split, document in split_stream(source.read(), validation_fraction, seed, source.dataset):
        documents[split] += 1
        read += len(document)
        if split in writers:
            batch.append((split, document))
            chars += len(document)
        if len(batch) >= _ENCODE_DOCUMENTS or chars >= _ENCODE_CHARS:
            _encode_into(batch, tokenizer, writers, token_counts)
            batch, chars = [], 0
            if on_progress is not None:
                on_progress(read, False)
    _encode_into(batch, tokenizer, writers, token_counts)
    if on_progress is not None:
        on_progress(read, True)
    np.save(os.path.join(cache_dir, TOKEN_COUNTS_FILE), token_counts)
    manifest = {
        "key": key,
        "splits": {
            name: {"documents": documents[name], "shards": writer.close()}
            for name, writer in writers.items()
        },
    }
    with tempfile.NamedTemporaryFile("w", dir=cache_dir, suffix=".tmp", delete=False) as file:
        json.dump(manifest, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(file.name, manifest_path)
    return _open_corpus(cache_dir, manifest, vocab_size, reused=False)


def _encode_into(batch, tokenizer, writers: dict, token_counts: np.ndarray) -> None:
    """Encodes `(split, document)` pairs and appends each split's ids (and eos) in order."""
    if not batch:
        return
    encoded = tokenizer.encode_batch([document for _, document in batch])
    eos = [tokenizer.eos_id]
    for name, writer in writers.items():
        pieces = [np.asarray(ids + eos) for (split, _), ids in zip(batch, encoded) if split == name]
        if not pieces:
            continue
        ids = np.concatenate(pieces)
        if ids.min() < 0 or ids.max() >= len(token_counts):
            raise ValueError(
                f"the tokenizer gave ids in [{ids.min()}, {ids.max()}]; expected ids in "
                f"[0, {len(token_counts)}) for its vocab_size."
            )
        writer.append(ids)
        if name == "train":
            token_counts += np.bincount(ids, minlength=len(token_counts))
