"""Documents of a streamed corpus (`text:` files, `tfds:` datasets), one at a time, and
their split into training and held-out documents by a stable hash.

Nothing here holds the corpus: a long text file is cut into bounded documents, and the
split needs no document count. `toex_tf.data.streaming` tokenizes what this reads into
token shards. Pure Python.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from toex_tf.data.corpus import iter_tfds_documents, text_file_paths

# A text file longer than this is cut into documents (`iter_text_documents`). 64 k
# characters keeps an article or a story whole, and SentencePiece encodes such documents
# 2-3x faster than 1 M-character ones (2.4 against 0.75 MB/s on 2 cores, a 4096-piece
# BPE model), as its cost per character grows with the length of what it encodes.
MAX_DOCUMENT_CHARS = 1 << 16


def iter_text_documents(
    paths: Sequence[str], max_document_chars: int = MAX_DOCUMENT_CHARS
) -> Iterator[str]:
    """Yields the documents of text files, reading each file a line at a time.

    A file of up to `max_document_chars` characters is one document, as in
    `read_text_files`. A longer file is cut into several: a document ends at the first
    blank line once it holds `max_document_chars` characters (paragraphs stay whole), or
    at the next line end once it holds twice that (a file without blank lines); a single
    line is read at most `max_document_chars` characters at a time. So no more than about
    `2 * max_document_chars` characters are ever held. Whitespace-only documents are
    dropped; bytes that are not UTF-8 become U+FFFD.
    """
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as file:
            parts, size = [], 0
            while line := file.readline(max_document_chars):
                parts.append(line)
                size += len(line)
                if size >= max_document_chars and (
                    not line.strip() or size >= 2 * max_document_chars
                ):
                    if (document := "".join(parts)).strip():
                        yield document
                    parts, size = [], 0
            if (document := "".join(parts)).strip():
                yield document


@dataclass(frozen=True)
class DocumentStream:
    """A dataset that can be read any number of times, one document at a time.

    Attributes:
        dataset: str, the `--dataset` value.
        fingerprint: dict, what identifies the text (JSON): a changed one rebuilds shards.
        read: `() -> Iterator[str]`, the non-empty documents in a fixed order.
        description: str, e.g. "12 files".
        size_bytes: int or None, the text's size when known (text files).
    """

    dataset: str
    fingerprint: dict
    read: Callable[[], Iterator[str]] = field(repr=False)
    description: str = ""
    size_bytes: int | None = None


def open_document_stream(
    dataset: str,
    data_dir: str | None = None,
    tfds_text_key: str = "text",
    tfds_split: str = "train",
    download: bool = False,
    max_document_chars: int = MAX_DOCUMENT_CHARS,
) -> DocumentStream:
    """A `text:GLOB` or `tfds:NAME` dataset as a `DocumentStream` (arguments as in
    `toex_tf.data.corpus.load_documents`; `max_document_chars` as in `iter_text_documents`).

    Text files are fingerprinted by path, size and modification time; a TFDS dataset by
    name, split, data directory and text key.

    Raises:
        ValueError: if the glob matches no files or `dataset` is not `text:` or `tfds:`.
    """
    if dataset.startswith("text:") and len(dataset) > len("text:"):
        paths = text_file_paths(dataset[len("text:") :])
        listing, size_bytes = hashlib.sha256(), 0
        for path in paths:
            stat = os.stat(path)
            size_bytes += stat.st_size
            listing.update(
                f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
            )
        fingerprint = {
            "dataset": dataset,
            "files": len(paths),
            "files_sha256": listing.hexdigest(),
            "max_document_chars": max_document_chars,
        }
        return DocumentStream(
            dataset,
            fingerprint,
            lambda: iter_text_documents(paths, max_document_chars),
            f"{len(paths)} files, {size_bytes / 1e6:.1f} MB",
            size_bytes,
        )
    if dataset.startswith("tfds:") and len(dataset) > len("tfds:"):
        name = dataset[len("tfds:") :]
        iter_tfds_documents(name, data_dir, tfds_text_key, tfds_split, download)  # fails early
        fingerprint = {
            "dataset": dataset,
            "data_dir": data_dir and os.path.abspath(os.path.expanduser(data_dir)),
            "split": tfds_split,
            "text_key": tfds_text_key,
        }

        def read() -> Iterator[str]:
            texts = iter_tfds_documents(name, data_dir, tfds_text_key, tfds_split, download)
            return (text for text in texts if text.strip())

        return DocumentStream(dataset, fingerprint, read, f"TFDS split {tfds_split!r}")
    raise ValueError(
        f"dataset {dataset!r} cannot be streamed; expected 'text:GLOB' or 'tfds:NAME'."
    )


STREAMED_PREFIXES = ("text:", "tfds:")


def is_streamed(dataset) -> bool:
    """Whether `dataset` is a `text:` or `tfds:` dataset (`open_document_stream`)."""
    return isinstance(dataset, str) and any(
        dataset.startswith(prefix) and len(dataset) > len(prefix) for prefix in STREAMED_PREFIXES
    )


def _split_score(seed: int, index: int) -> float:
    """A uniform number in [0, 1) that depends only on `(seed, index)`."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def split_stream(
    documents: Iterable[str], validation_fraction: float = 0.1, seed: int = 0, source: str = ""
) -> Iterator[tuple[str, str]]:
    """Splits a stream of documents into train and validation, deterministically.

    Document `i` is held out when `_split_score(seed, i) < validation_fraction`, so the
    split needs no count of documents and no second pass. So that each side gets at least
    one document, each side keeps one document back until the end: train the one with
    the lowest score, validation the one with the highest. If a side ended empty, the
    other side's kept document moves to it; otherwise each is yielded last on its side.

    Args:
        documents: iterable of str, in a fixed order.
        validation_fraction: float in (0, 1), defaults to 0.1.
        seed: int, defaults to 0.
        source: str, the dataset's name for error messages.

    Yields:
        `(split, document)` with `split` "train" or "validation"; every document once.

    Raises:
        ValueError: if `validation_fraction` is not in (0, 1), or (after the last
            document) there are fewer than 2 documents.
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction must be strictly between 0 and 1, got {validation_fraction!r}."
        )
    kept: dict[str, tuple[float, str] | None] = {"train": None, "validation": None}
    counts = {"train": 0, "validation": 0}
    for index, document in enumerate(documents):
        score = _split_score(seed, index)
        split = "validation" if score < validation_fraction else "train"
        counts[split] += 1
        candidate = (score, document)
        previous = kept[split]
        if previous is None or (score < previous[0]) == (split == "train"):
            kept[split], candidate = candidate, previous
        if candidate is not None:
            yield split, candidate[1]
    total = counts["train"] + counts["validation"]
    if total == 0:
        raise ValueError(
            f"dataset {source!r} gave an empty corpus (no document has non-whitespace "
            "text); expected at least one non-empty document."
        )
    if total < 2:
        raise ValueError(
            f"validation_fraction={validation_fraction} needs at least 2 documents (one on "
            f"each side of the split); dataset {source!r} has {total}."
        )
    for split, other in (("train", "validation"), ("validation", "train")):
        if kept[split] is not None:
            yield (other if counts[other] == 0 else split), kept[split][1]
