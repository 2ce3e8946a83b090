"""Sentence pairs for translation (English → X), split into train, validation and test.

The built-in source needs no download: the gettext catalogs (`.mo` files) already on the
machine hold human translations of program messages, and their msgids are English. The
catalogs are split *by catalog*, so validation and test hold messages of programs that the
model never saw in training. Local files and TFDS datasets are accepted too. This module is
pure Python: TensorFlow Datasets is imported only when a `tfds:` dataset is asked for.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import random

from toex_tf.data.gettext_catalogs import (  # noqa: F401 - re-exported
    SPLITS,
    Pair,
    gettext_catalogs,
    load_gettext_pairs,
    read_catalog,
)
from toex_tf.data.languages import check_language  # noqa: F401 - re-exported

_ACCEPTED_DATASETS = (
    "'gettext', 'gettext:DIR', 'files:SOURCE_PATH,TARGET_PATH', 'tsv:PATH' or 'tfds:NAME'"
)


@dataclasses.dataclass(frozen=True)
class ParallelCorpus:
    """Sentence pairs split for training a translation model.

    Args:
        train: list of `(source, target)` pairs of str.
        validation: list of `(source, target)` pairs of str.
        test: list of `(source, target)` pairs of str.
        source_lang: str. Normalised language code of the sources, e.g. `"en"`.
        target_lang: str. Normalised language code of the targets, e.g. `"ro"`.
        summary: dict. JSON-serializable provenance: `dataset`, the languages, `pairs`
            (count per split), `skipped` (entries dropped, per reason: `header`, `plural`,
            `untranslated`, `identical`, `no_letters`, `duplicate`, `source_seen_in_train`
            for gettext; `empty`, `duplicate` otherwise) and, for gettext, `catalogs` (names
            per split) and `searched` (the globs searched).
    """

    train: list[Pair]
    validation: list[Pair]
    test: list[Pair]
    source_lang: str
    target_lang: str
    summary: dict


def _read_lines(path: str) -> list[str]:
    """Returns the lines of a UTF-8 text file, without line endings."""
    try:
        # utf-8-sig drops a byte-order mark; undecodable bytes become U+FFFD.
        with open(os.path.expanduser(path), encoding="utf-8-sig", errors="replace") as file:
            text = file.read()
    except OSError as error:
        raise ValueError(f"could not read {path!r} ({error}); expected a text file.") from error
    # Not `splitlines`: it also splits at U+2028 and form feeds, which would misalign pairs.
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _read_files(paths: str) -> list[Pair]:
    """Reads `"SOURCE_PATH,TARGET_PATH"`: two aligned files, one sentence a line."""
    if paths.count(",") != 1 or paths.startswith(",") or paths.endswith(","):
        raise ValueError(
            f"dataset 'files:{paths}' does not name two files; expected "
            "'files:SOURCE_PATH,TARGET_PATH'."
        )
    source_path, target_path = paths.split(",")
    sources, targets = _read_lines(source_path), _read_lines(target_path)
    if len(sources) != len(targets):
        raise ValueError(
            f"source file {source_path!r} has {len(sources)} lines but target file "
            f"{target_path!r} has {len(targets)}; expected aligned files with one sentence "
            "per line."
        )
    return list(zip(sources, targets))


def _read_tsv(path: str) -> list[Pair]:
    """Reads `source<TAB>target` lines, splitting at the first tab; blank lines are skipped."""
    pairs = []
    for number, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(
                f"line {number} of {path!r} has no tab: {line[:60]!r}; expected "
                "'source<TAB>target' on every non-empty line."
            )
        source, target = line.split("\t", 1)
        pairs.append((source, target))
    return pairs


def _clean(pairs: list[Pair], skipped: collections.Counter) -> list[Pair]:
    """Strips both sides, drops pairs with an empty side and keeps duplicates once."""
    stripped = [(source.strip(), target.strip()) for source, target in pairs]
    kept = [pair for pair in stripped if pair[0] and pair[1]]
    skipped["empty"] += len(stripped) - len(kept)
    unique = list(dict.fromkeys(kept))
    skipped["duplicate"] += len(kept) - len(unique)
    return unique


def _split_pairs(
    pairs: list[Pair], validation_fraction: float, test_fraction: float, seed: int, dataset: str
) -> dict[str, list[Pair]]:
    """Shuffles pairs with `seed` and holds out test and validation (≥ 1 pair each)."""
    if len(pairs) < 3:
        raise ValueError(
            f"dataset {dataset!r} has {len(pairs)} usable pairs; expected at least 3 (one "
            "each for train, validation and test)."
        )
    indices = list(range(len(pairs)))
    random.Random(seed).shuffle(indices)
    num_test = min(max(round(len(pairs) * test_fraction), 1), len(pairs) - 2)
    num_validation = min(max(round(len(pairs) * validation_fraction), 1), len(pairs) - num_test - 1)
    test, validation = indices[:num_test], indices[num_test : num_test + num_validation]
    train = indices[num_test + num_validation :]
    return {
        split: [pairs[i] for i in part] for split, part in zip(SPLITS, (train, validation, test))
    }


def _load_tfds(
    name: str,
    data_dir: str | None,
    download: bool,
    source_lang: str,
    target_lang: str,
    max_pairs: int | None,
) -> dict[str, list[Pair]]:
    """Loads TFDS's own train/validation/test splits of a translation dataset."""
    import tensorflow_datasets as tfds  # Lazy: pulls in TensorFlow.

    splits = {}
    for split in SPLITS:
        # Slicing in TFDS reads only the first examples instead of the whole split.
        split_spec = split if max_pairs is None else f"{split}[:{max_pairs}]"
        try:
            dataset = tfds.load(
                name, split=split_spec, data_dir=data_dir, download=download, try_gcs=False
            )
        except Exception as error:  # tfds raises several unrelated types here.
            # Only the first line: tfds's not-found message goes on to list every dataset.
            first_line = (str(error).strip().splitlines() or [""])[0]
            raise ValueError(
                f"could not load split {split!r} of TFDS dataset {name!r} from data_dir "
                f"{data_dir!r} with download={download} ({type(error).__name__}: "
                f"{first_line}). Expected a prepared dataset: prepare it first on a machine "
                f"with network access (e.g. `tfds build {name} --data_dir={data_dir or 'DIR'}`"
                ") and pass that data_dir, or pass download=True."
            ) from error
        spec = dataset.element_spec
        available = sorted(spec) if isinstance(spec, dict) else []
        for argument, code in (("source_lang", source_lang), ("target_lang", target_lang)):
            if code not in available:
                raise ValueError(
                    f"{argument} {code!r} is not a feature of TFDS dataset {name!r}; "
                    f"expected one of {available}."
                )
        splits[split] = [
            tuple(
                text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
                for text in (example[source_lang], example[target_lang])
            )
            for example in tfds.as_numpy(dataset)
        ]
    return splits


def load_parallel(
    dataset: str = "gettext",
    source_lang: str = "en",
    target_lang: str = "ro",
    data_dir: str | None = None,
    validation_fraction: float = 0.05,
    test_fraction: float = 0.1,
    seed: int = 0,
    download: bool = False,
    max_pairs: int | None = None,
) -> ParallelCorpus:
    """Loads sentence pairs for translation, split into train, validation and test.

    Surrounding whitespace is stripped from both sides (nothing else is normalised; inner
    newlines stay); pairs with an empty side are skipped and exact duplicates kept once.

    Args:
        dataset: str, defaults to `"gettext"`. One of:
            `"gettext"`: the gettext catalogs on this machine (see `gettext_catalogs`);
            `"gettext:DIR"`: only the catalogs under `DIR`. Entries that are the header,
            plural, untranslated, identical to the msgid or without a letter outside format
            specifiers are skipped; msgctxt is dropped. Whole catalogs go to test, then
            validation, until each holds its fraction of the pairs (catalogs ordered by
            CRC-32 of seed and name; one above half of all pairs stays in train); held-out
            pairs whose source also occurs in train are dropped.
            `"files:SOURCE_PATH,TARGET_PATH"`: two aligned UTF-8 files, one sentence a line.
            `"tsv:PATH"`: `source<TAB>target` lines (split at the first tab).
            `"tfds:NAME"`, e.g. `"tfds:wmt16_translate/ro-en"`: a TFDS dataset whose
            examples have one feature per language code; its own splits are used.
            The files and tsv forms are shuffled with `seed` and split by pair.
        source_lang: str, defaults to `"en"`. Source language code; `"en"` for gettext.
        target_lang: str, defaults to `"ro"`. Target language code.
        data_dir: str or None, defaults to None. TFDS data directory (None: the TFDS
            default). Ignored for other datasets.
        validation_fraction: float, defaults to 0.05. Share of pairs held out for validation.
        test_fraction: float, defaults to 0.1. Share of pairs held out for test. Both are in
            (0, 1) with a sum below 1; ignored for TFDS.
        seed: int, defaults to 0. Seed of the split (and of the shuffle of each split).
        download: bool, defaults to False. Whether TFDS may download and prepare the dataset.
        max_pairs: int or None, defaults to None. If set, each split keeps at most this many
            pairs (a random subset for gettext/files/tsv, the first ones for TFDS).

    Returns:
        A `ParallelCorpus`.

    Raises:
        ValueError: if an argument is invalid, the data is missing or malformed, or a split
            would be empty.

    Example:
        >>> corpus = load_parallel("gettext", "en", "ro")  # doctest: +SKIP
        >>> corpus.train[0]  # doctest: +SKIP
        ('Cancel', 'Anulează')
    """
    if not isinstance(dataset, str):
        raise TypeError(f"dataset must be a str, got {type(dataset).__name__}: {dataset!r}.")
    source_lang = check_language("source_lang", source_lang)
    target_lang = check_language("target_lang", target_lang)
    if source_lang == target_lang:
        raise ValueError(
            f"source_lang and target_lang are both {source_lang!r}; expected two languages."
        )
    fractions = {"validation_fraction": validation_fraction, "test_fraction": test_fraction}
    for name, fraction in fractions.items():
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{name} must be strictly between 0 and 1, got {fraction!r}.")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"validation_fraction + test_fraction is {validation_fraction + test_fraction!r}; "
            "expected below 1 so that train keeps pairs."
        )
    if max_pairs is not None and (
        isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1
    ):
        raise ValueError(f"max_pairs must be None or a positive int, got {max_pairs!r}.")
    kind, _, argument = dataset.partition(":")
    summary: dict = {"dataset": dataset, "source_lang": source_lang, "target_lang": target_lang}
    skipped: collections.Counter = collections.Counter()
    if kind == "gettext" and (argument or dataset == "gettext"):
        if source_lang.split("_")[0] != "en":
            raise ValueError(
                f"source_lang {source_lang!r} is not English, but gettext msgids are English; "
                "expected source_lang='en' with a gettext dataset."
            )
        splits, details = load_gettext_pairs(
            argument or None, target_lang, validation_fraction, test_fraction, seed
        )
        summary.update(details)
    elif kind == "files" and argument:
        pairs = _clean(_read_files(argument), skipped)
        splits = _split_pairs(pairs, validation_fraction, test_fraction, seed, dataset)
    elif kind == "tsv" and argument:
        pairs = _clean(_read_tsv(argument), skipped)
        splits = _split_pairs(pairs, validation_fraction, test_fraction, seed, dataset)
    elif kind == "tfds" and argument:
        loaded = _load_tfds(argument, data_dir, download, source_lang, target_lang, max_pairs)
        splits = {split: _clean(pairs, skipped) for split, pairs in loaded.items()}
    else:
        raise ValueError(f"dataset {dataset!r} is not recognised; expected {_ACCEPTED_DATASETS}.")
    if kind != "gettext":
        summary["skipped"] = dict(sorted(skipped.items()))
    if kind != "tfds":
        rng = random.Random(seed)
        for split in SPLITS:
            rng.shuffle(splits[split])
    if max_pairs is not None:
        splits = {split: pairs[:max_pairs] for split, pairs in splits.items()}
    summary["pairs"] = {split: len(splits[split]) for split in SPLITS}
    return ParallelCorpus(
        **splits, source_lang=source_lang, target_lang=target_lang, summary=summary
    )
