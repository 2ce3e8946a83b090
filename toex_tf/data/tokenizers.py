"""Tokenizers behind the `--tokenizer=byte|sentencepiece --vocab_size=N` flags.

Both tokenizers are lossless (`decode(encode(text)) == text`) and never produce an unknown
id: the byte tokenizer by construction, SentencePiece through byte fallback. `save` writes a
`tokenizer.json` manifest next to whatever else is needed, and `load_tokenizer` reads it back.
Pure Python: `sentencepiece` is imported only by `SentencePieceTokenizer`.
"""

from __future__ import annotations

import abc
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence

MANIFEST_FILE = "tokenizer.json"
SENTENCEPIECE_MODEL_FILE = "tokenizer.model"
TOKENIZER_KINDS = ("byte", "sentencepiece")

# 256 byte-fallback pieces, unk, eos and the newline piece are always in a SentencePiece
# vocabulary; 300 leaves a little room for the corpus's characters and merges. Below that
# SentencePiece fails with a less helpful message (or the vocabulary is all bytes anyway).
MIN_SENTENCEPIECE_VOCAB_SIZE = 300

# SentencePiece drops training sentences longer than this many bytes; we cut longer ones.
_MAX_SENTENCE_BYTES = 1 << 16


class Tokenizer(abc.ABC):
    """The interface every tokenizer implements.

    Subclasses define `vocab_size`, `eos_id`, `encode`, `decode` and `save`; ids are always
    in `[0, vocab_size)`.
    """

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id is in `[0, vocab_size)`."""

    @property
    @abc.abstractmethod
    def eos_id(self) -> int:
        """Id appended after each document (end of sequence)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Returns the ids of `text` (without eos)."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`, skipping special ids such as eos."""

    @abc.abstractmethod
    def save(self, directory: str) -> str:
        """Writes what `load_tokenizer(directory)` needs; returns the manifest path."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Returns `[self.encode(text) for text in texts]`; subclasses may batch faster."""
        return [self.encode(text) for text in texts]

    def id_surfaces(self) -> list[bytes]:
        """Each id's bytes as they read in decoded text after other text.

        Entry `i` is what id `i` adds to `decode(ids)` when it is not the first id (no
        leading-space stripping), before invalid UTF-8 is replaced; special ids give `b""`.
        The in-graph decoder of `toex_tf.export.graph_text` is built from this table.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no per-id surface table; in-graph decoding supports "
            "ByteTokenizer and SentencePieceTokenizer."
        )


def write_manifest(directory: str, manifest: dict) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MANIFEST_FILE)
    # Written whole then renamed: a reader (another worker of a multi-worker run) never
    # sees half a manifest.
    with open(path + ".tmp", "w", encoding="utf-8") as file:
        json.dump(manifest, file, indent=2, sort_keys=True)
        file.write("\n")
    os.replace(path + ".tmp", path)
    return path


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, plus eos = 256 (`vocab_size` 257).

    Needs no training and works on any text, at the cost of the longest sequences (one
    token per byte).

    Example:
        >>> tokenizer = ByteTokenizer()
        >>> tokenizer.encode("hé")
        [104, 195, 169]
        >>> tokenizer.decode([104, 195, 169, tokenizer.eos_id])
        'hé'
    """

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        byte_values = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return byte_values.decode("utf-8", errors="replace")

    def id_surfaces(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [b""]

    def save(self, directory: str) -> str:
        return write_manifest(directory, {"type": "byte"})

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """Yields the paragraphs of `documents`, the units SentencePiece trains on.

    Paragraphs (not lines) keep their inner newlines, so the statistics SentencePiece
    learns match how whole documents are encoded later; on the built-in corpus this gives
    1% fewer tokens than training on lines.
    """
    max_chars = _MAX_SENTENCE_BYTES // 4  # A character is at most 4 UTF-8 bytes.
    for document in documents:
        for paragraph in document.split("\n\n"):
            paragraph = paragraph.strip("\n")
            for start in range(0, len(paragraph), max_chars):
                chunk = paragraph[start : start + max_chars]
                if chunk.strip():
                    yield chunk


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model with byte fallback, loaded from a `.model` file.

    Train one with `SentencePieceTokenizer.train`. The model normalises nothing (identity
    rule, spaces kept), so encoding is lossless, and newline is a piece of its own.

    Args:
        model_file: str. Path of a SentencePiece `.model` file.

    Raises:
        ValueError: if `model_file` is missing or not a valid model, or the model has no
            eos piece.

    Example:
        >>> tokenizer = SentencePieceTokenizer.train(documents, 4096, "out/tokenizer")
        >>> tokenizer = SentencePieceTokenizer("out/tokenizer/tokenizer.model")
    """

    def __init__(self, model_file: str):
        import sentencepiece  # Lazy: only SentencePiece users need it.

        if not os.path.isfile(model_file):
            raise ValueError(
                f"model_file {model_file!r} does not exist; expected a SentencePiece .model file."
            )
        with open(model_file, "rb") as file:
            self._model_proto = file.read()
        try:
            self._processor = sentencepiece.SentencePieceProcessor(model_proto=self._model_proto)
        except (RuntimeError, OSError) as error:
            raise ValueError(
                f"model_file {model_file!r} is not a valid SentencePiece model ({error}); "
                "expected a file written by SentencePieceTokenizer.train or spm_train."
            ) from error
        if self._processor.eos_id() < 0:
            raise ValueError(
                f"model_file {model_file!r} has no eos piece (eos_id is -1); expected a model "
                "trained with eos_id >= 0."
            )
        self.model_file = model_file

    @classmethod
    def train(
        cls,
        documents: Iterable[str],
        vocab_size: int,
        model_dir: str,
        model_type: str = "bpe",
        seed: int = 0,
        character_coverage: float = 0.9995,
        input_sentence_size: int = 2_000_000,
    ) -> SentencePieceTokenizer:
        """Trains a model on `documents`, saves it in `model_dir` and returns it.

        BPE is the default because it is 10x faster to train than unigram here and
        compresses as well: on the built-in corpus (2.1 M characters) a 4096-piece BPE
        model trains in 0.2 s and gives 615 k tokens, unigram takes 3 s for 620 k tokens.
        Training uses one thread and a fixed sampling seed, so the same documents always
        give a byte-identical model.

        Args:
            documents: iterable of str. Training text; split into paragraphs internally.
            vocab_size: int. Number of pieces, at least 300 (256 byte-fallback pieces,
                unk, eos and newline are always included).
            model_dir: str. Directory to write `tokenizer.model` and `tokenizer.json` to;
                created if needed.
            model_type: str, defaults to `"bpe"`. `"bpe"` or `"unigram"`.
            seed: int, defaults to 0. Seed of SentencePiece's sentence sampling.
            character_coverage: float, defaults to 0.9995. Fraction of characters that get
                their own piece; the rarest rest are spelled as UTF-8 bytes.
            input_sentence_size: int, defaults to 2,000,000. Most paragraphs sampled for
                training (bounds time and memory on large corpora; the built-in corpus has
                17 k).

        Returns:
            The trained tokenizer.

        Raises:
            ValueError: if `vocab_size` is below 300, too small for the corpus's characters
                or too large for the corpus, or `model_type` is not accepted. SentencePiece's
                own errors are re-raised as ValueError naming `vocab_size`.
        """
        import sentencepiece  # Lazy: only SentencePiece users need it.

        if not isinstance(vocab_size, int) or vocab_size < MIN_SENTENCEPIECE_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size must be an int >= {MIN_SENTENCEPIECE_VOCAB_SIZE} for SentencePiece "
                f"(256 byte-fallback pieces, unk, eos and newline are always included), got "
                f"{vocab_size!r}."
            )
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}.")
        os.makedirs(model_dir, exist_ok=True)
        # Seeds the reservoir sampling of `input_sentence_size`; with one thread the rest
        # of training is deterministic too (checked: identical model bytes across runs).
        sentencepiece.set_random_generator_seed(seed)
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=_training_sentences(documents),
                model_writer=model,
                model_type=model_type,
                vocab_size=vocab_size,
                num_threads=1,
                character_coverage=character_coverage,
                byte_fallback=True,
                # Lossless: keep text as is (no NFKC, no whitespace collapsing) and give
                # newline its own piece so documents keep their line structure.
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                user_defined_symbols=["\n"],
                allow_whitespace_only_pieces=True,
                split_digits=True,
                unk_id=0,
                eos_id=1,
                bos_id=-1,
                pad_id=-1,
                max_sentence_length=_MAX_SENTENCE_BYTES,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                minloglevel=2,
            )
        except RuntimeError as error:
            message = str(error)
            too_high = re.search(r"Vocabulary size too high.*?<= (\d+)", message)
            if too_high:
                raise ValueError(
                    f"vocab_size {vocab_size} is too large for this corpus; SentencePiece "
                    f"can build at most {too_high.group(1)} pieces from it. Use a smaller "
                    "vocab_size or more text."
                ) from error
            too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
            if too_low:
                raise ValueError(
                    f"vocab_size {vocab_size} is too small for the characters of this corpus; "
                    f"expected at least {too_low.group(1)} (one piece per character kept by "
                    f"character_coverage {character_coverage}, plus the fixed pieces)."
                ) from error
            raise ValueError(
                f"SentencePiece training failed for vocab_size {vocab_size}, model_type "
                f"{model_type!r}: {message}"
            ) from error
        model_file = os.path.join(model_dir, SENTENCEPIECE_MODEL_FILE)
        with open(model_file, "wb") as file:
            file.write(model.getvalue())
        tokenizer = cls(model_file)
        tokenizer.save(model_dir)
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self._processor.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self._processor.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._processor.encode(list(texts), out_type=int)

    def decode(self, ids: Iterable[int]) -> str:
        # SentencePiece skips control pieces (eos, unk) itself; out-of-range ids would
        # raise, so they are dropped like other special ids.
        vocab_size = self.vocab_size
        return self._processor.decode([int(i) for i in ids if 0 <= int(i) < vocab_size])

    def id_to_piece(self, token_id: int) -> str:
        """Returns the piece string of `token_id` (for inspecting a vocabulary)."""
        return self._processor.id_to_piece(int(token_id))

    @property
    def model_proto(self) -> bytes:
        """The serialized SentencePiece model (the bytes of the `.model` file)."""
        return self._model_proto

    def control_ids(self) -> list[int]:
        """Ids of control pieces (eos, bos, ...): they decode to nothing, and they end a run
        of byte pieces (bytes on either side never join into one character)."""
        return [i for i in range(self.vocab_size) if self._processor.is_control(i)]

    def id_surfaces(self) -> list[bytes]:
        processor = self._processor
        # The unknown piece decodes to the model's unk surface (" \u2047 " by default):
        # read it off a decode after a plain piece, so no leading space is stripped.
        plain = next(
            i
            for i in range(self.vocab_size)
            if not (processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i))
        )
        before = processor.decode([plain])
        surfaces = []
        for i in range(self.vocab_size):
            piece = processor.id_to_piece(i)
            if processor.is_control(i):
                surfaces.append(b"")
            elif processor.is_byte(i):  # "<0xAB>"
                surfaces.append(bytes([int(piece[3:5], 16)]))
            elif processor.is_unknown(i):
                surfaces.append(processor.decode([plain, i])[len(before) :].encode("utf-8"))
            else:
                surfaces.append(piece.replace("\u2581", " ").encode("utf-8"))
        return surfaces

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        model_file = os.path.join(directory, SENTENCEPIECE_MODEL_FILE)
        if os.path.abspath(model_file) != os.path.abspath(self.model_file):
            with open(model_file, "wb") as file:
                file.write(self._model_proto)
        return write_manifest(
            directory, {"type": "sentencepiece", "model_file": SENTENCEPIECE_MODEL_FILE}
        )

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_file!r}, vocab_size={self.vocab_size})"


def load_tokenizer(directory: str) -> Tokenizer:
    """Loads the tokenizer that `Tokenizer.save` (or `make_tokenizer`) wrote to `directory`.

    Args:
        directory: str. Directory holding `tokenizer.json` (and, for SentencePiece, the
            model file it names).

    Returns:
        A `ByteTokenizer` or a `SentencePieceTokenizer`.

    Raises:
        ValueError: if the directory, the manifest or the model file is missing or corrupt.

    Example:
        >>> tokenizer = load_tokenizer("checkpoints/run1/tokenizer")  # doctest: +SKIP
    """
    manifest_path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.isfile(manifest_path):
        raise ValueError(
            f"tokenizer directory {directory!r} has no {MANIFEST_FILE}; expected a directory "
            "written by Tokenizer.save or make_tokenizer."
        )
    try:
        with open(manifest_path, encoding="utf-8") as file:
            manifest = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"tokenizer manifest {manifest_path!r} is not valid JSON ({error}); expected e.g. "
            '{"type": "byte"}.'
        ) from error
    kind = manifest.get("type") if isinstance(manifest, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "sentencepiece":
        model_file = manifest.get("model_file")
        if not isinstance(model_file, str) or not model_file:
            raise ValueError(
                f"tokenizer manifest {manifest_path!r} has model_file {model_file!r}; expected "
                "the name of the SentencePiece model file in the same directory."
            )
        return SentencePieceTokenizer(os.path.join(directory, model_file))
    if kind == "hf_json":
        from toex_tf.data.hf_tokenizer import HF_JSON_FILE, HFJsonTokenizer  # noqa: PLC0415

        return HFJsonTokenizer(
            os.path.join(directory, manifest.get("json_file", HF_JSON_FILE)),
            eos_token=manifest.get("eos_token"),
            bos_token=manifest.get("bos_token"),
            add_bos=bool(manifest.get("add_bos", False)),
        )
    raise ValueError(
        f"tokenizer manifest {manifest_path!r} has type {kind!r}; expected one of "
        f"{list(TOKENIZER_KINDS)}."
    )


def run_tokenizer(output_dir: str, tokenizer, make) -> Tokenizer:
    """A run's tokenizer, kept in `output_dir/tokenizer` so that ids never shift.

    `tokenizer` when given (saved there if none is), else the one saved there, else
    `make(tokenizer_dir)` (which trains one and saves it there).
    """
    tokenizer_dir = os.path.join(output_dir, "tokenizer")
    saved = os.path.exists(os.path.join(tokenizer_dir, MANIFEST_FILE))
    if tokenizer is not None:
        if not saved:
            tokenizer.save(tokenizer_dir)
        return tokenizer
    if saved:
        return load_tokenizer(tokenizer_dir)
    return make(tokenizer_dir)


def make_tokenizer(
    kind: str, documents: Iterable[str], vocab_size: int | None, model_dir: str
) -> Tokenizer:
    """Builds the tokenizer named by the `--tokenizer` flag and saves it to `model_dir`.

    Args:
        kind: str. `"byte"` or `"sentencepiece"`.
        documents: iterable of str. Training text (unused for `"byte"`).
        vocab_size: int or None. SentencePiece vocabulary size (>= 300). For `"byte"` it
            must be None or 257, the byte tokenizer's fixed size.
        model_dir: str. Directory the tokenizer is saved to; `load_tokenizer(model_dir)`
            reloads it.

    Returns:
        The tokenizer.

    Raises:
        ValueError: if `kind` is unknown or `vocab_size` does not fit it.

    Example:
        >>> tokenizer = make_tokenizer("sentencepiece", builtin_corpus(), 4096, "out/tok")
    """
    if kind == "byte":
        tokenizer = ByteTokenizer()
        if vocab_size is not None and vocab_size != tokenizer.vocab_size:
            raise ValueError(
                f"vocab_size must be None or {tokenizer.vocab_size} for the byte tokenizer "
                f"(its size is fixed), got {vocab_size!r}."
            )
        tokenizer.save(model_dir)
        return tokenizer
    if kind == "sentencepiece":
        if vocab_size is None:
            raise ValueError(
                "vocab_size must be an int >= "
                f"{MIN_SENTENCEPIECE_VOCAB_SIZE} for the sentencepiece tokenizer, got None."
            )
        return SentencePieceTokenizer.train(documents, vocab_size, model_dir)
    raise ValueError(
        f"tokenizer kind {kind!r} is not recognised; expected one of {TOKENIZER_KINDS}."
    )


def __getattr__(name):
    # `HFJsonTokenizer` lives in `toex_tf.data.hf_tokenizer` (it needs the `tokenizers`
    # library); this keeps `from toex_tf.data.tokenizers import HFJsonTokenizer` working.
    if name in ("HFJsonTokenizer", "HF_JSON_FILE", "EOS_CANDIDATES"):
        from toex_tf.data import hf_tokenizer  # noqa: PLC0415

        return getattr(hf_tokenizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
