"""English → X sentence pairs from the gettext catalogs (`.mo` files) on the machine.

Programs ship human translations of their messages, and the msgids are English. They are
read with the standard library's `gettext`, at run time: no text is copied anywhere. The
catalogs are split *by catalog*, so validation and test hold messages of programs that the
model never saw in training. `toex_tf.data.parallel.load_parallel("gettext")` is the entry.
"""

from __future__ import annotations

import collections
import gettext
import glob
import os
import re
import site
import struct
import sysconfig
import zlib
from collections.abc import Sequence

from toex_tf.data.languages import check_language

Pair = tuple[str, str]

SPLITS = ("train", "validation", "test")

_SYSTEM_LOCALE_DIR = "/usr/share/locale"

# A held-out catalog above this share of all pairs would leave train with the minority.
_MAX_HELD_OUT_CATALOG_SHARE = 0.5

# printf (`%s`, `%1$s`, `%-10.3lf`, `%%`), Python (`%(name)s`) and brace (`{0}`, `{name:>4}`)
# specifiers. A msgid with no letter left after removing them ("%s: %s", "…") teaches the
# model nothing about language.
_FORMAT_SPECIFIER = re.compile(
    r"%(?:\([^)]*\))?(?:\d+\$)?[-+ #0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?"
    r"(?:hh|h|ll|l|L|q|j|z|t)?[diouxXeEfFgGaAcspnm%]"
    r"|\{[^{}]*\}"
)


def read_catalog(path: str) -> dict[str | tuple[str, int], str]:
    """Reads one compiled gettext catalog (`.mo`) with the standard library.

    Args:
        path: str. Path of the `.mo` file.

    Returns:
        The stdlib's view of the entries, decoded with the catalog's charset: msgid →
        msgstr, with the header under `""`, plural forms under `(msgid, index)` tuple
        keys and msgids with a context as `"context\\x04msgid"`.

    Raises:
        ValueError: if the file does not exist, or is corrupt or not a `.mo` file.
    """
    if not os.path.isfile(path):
        raise ValueError(f"gettext catalog {path!r} is not a file; expected a .mo file.")
    try:
        with open(path, "rb") as file:
            return dict(gettext.GNUTranslations(file)._catalog)
    # Each is a way a damaged file fails inside the stdlib parser: bad magic or offsets
    # (OSError), a short header (struct.error), a wrong charset (UnicodeError,
    # LookupError), a malformed plural entry or formula (ValueError).
    except (OSError, struct.error, UnicodeError, LookupError, ValueError) as error:
        reason = f"{type(error).__name__}: {error}"
        raise ValueError(
            f"gettext catalog {path!r} is corrupt or not a .mo file ({reason}); expected "
            "a compiled GNU gettext catalog."
        ) from error


def _site_directories() -> list[str]:
    """Returns the existing site-packages directories, deduplicated, in a fixed order."""
    directories = [*site.getsitepackages(), site.getusersitepackages()]
    directories.append(sysconfig.get_paths()["purelib"])
    return [d for d in dict.fromkeys(directories) if os.path.isdir(d)]


def _in_other_language(path: str, target_lang: str) -> bool:
    """Whether `path` lies in a `<language>/LC_MESSAGES` directory of another language."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    return any(
        part == "LC_MESSAGES" and parts[i - 1] != target_lang for i, part in enumerate(parts) if i
    )


def _search_catalogs(
    target_lang: str, directories: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """Returns `(sorted .mo paths, the globs searched)`; see `gettext_catalogs`."""
    patterns = []
    if directories is None:
        patterns.append(os.path.join(_SYSTEM_LOCALE_DIR, target_lang, "LC_MESSAGES", "*.mo"))
        for directory in _site_directories():
            patterns.append(
                os.path.join(directory, "**", "locale", target_lang, "LC_MESSAGES", "*.mo")
            )
    else:
        for directory in directories:
            directory = os.path.expanduser(directory)
            messages_dir = os.path.join(directory, target_lang, "LC_MESSAGES")
            if os.path.isdir(messages_dir):
                patterns.append(os.path.join(messages_dir, "*.mo"))
            else:
                patterns.append(os.path.join(directory, "**", "*.mo"))
    paths = set()
    for pattern in patterns:
        for path in glob.glob(pattern, recursive=True):
            # A recursive search of a locale tree must not take other languages' catalogs.
            if os.path.isfile(path) and not _in_other_language(path, target_lang):
                # Resolved, so a symlinked alias (iso_639.mo -> iso_639-2.mo) counts once
                # and under its file's own name, whatever order the directory lists.
                paths.add(os.path.realpath(path))
    return sorted(paths), patterns


def gettext_catalogs(target_lang: str, directories: Sequence[str] | None = None) -> list[str]:
    """Finds the gettext catalogs that translate into `target_lang`.

    Only the exact `target_lang` directory is searched: `"ro"` does not find `ro_RO`.

    Args:
        target_lang: str. Language code, e.g. `"ro"` (see `check_language`).
        directories: sequence of str or None, defaults to None. None searches the system
            catalogs `/usr/share/locale/<target_lang>/LC_MESSAGES/*.mo` and, in every
            site-packages directory, `**/locale/<target_lang>/LC_MESSAGES/*.mo`. Otherwise
            each directory `DIR` contributes `DIR/<target_lang>/LC_MESSAGES/*.mo` if that
            directory exists, else every `*.mo` under `DIR` at any depth, except those in an
            `LC_MESSAGES` directory of another language.

    Returns:
        The sorted paths of the catalogs found, symlinks resolved (each file once).

    Example:
        >>> paths = gettext_catalogs("ro")  # doctest: +SKIP
    """
    target_lang = check_language("target_lang", target_lang)
    return _search_catalogs(target_lang, directories)[0]


def _catalog_pairs(path: str, skipped: collections.Counter) -> list[Pair]:
    """Returns the usable pairs of one catalog, counting each skipped entry's reason."""
    pairs = []
    for key, value in read_catalog(path).items():
        if key == "":
            skipped["header"] += 1
            continue
        if isinstance(key, tuple):
            skipped["plural"] += 1  # One per plural form.
            continue
        source = key.rpartition("\x04")[2].strip()  # Drops a msgctxt prefix.
        target = value.strip()
        if not target:
            skipped["untranslated"] += 1
        elif target == source:
            skipped["identical"] += 1
        elif not any(char.isalpha() for char in _FORMAT_SPECIFIER.sub("", source)):
            skipped["no_letters"] += 1
        else:
            pairs.append((source, target))
    return pairs


def _assign_catalogs(
    sizes: dict[str, int], validation_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[str]]:
    """Assigns whole catalogs to splits: test first, then validation, the rest to train."""
    total = sum(sizes.values())
    order = sorted(sizes, key=lambda name: (zlib.crc32(f"{seed}:{name}".encode()), name))
    assigned: dict[str, list[str]] = {split: [] for split in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    for name in order:
        if sizes[name] > _MAX_HELD_OUT_CATALOG_SHARE * total:
            split = "train"
        elif counts["test"] < test_fraction * total:
            split = "test"
        elif counts["validation"] < validation_fraction * total:
            split = "validation"
        else:
            split = "train"
        assigned[split].append(name)
        counts[split] += sizes[name]
    return assigned


def load_gettext_pairs(
    directory: str | None,
    target_lang: str,
    validation_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[dict[str, list[Pair]], dict]:
    """Loads gettext pairs split by catalog; returns `(pairs per split, summary)`.

    See `toex_tf.data.parallel.load_parallel` (`dataset="gettext[:DIR]"`) for the rules.
    """
    if directory is not None and not os.path.isdir(os.path.expanduser(directory)):
        raise ValueError(f"gettext directory {directory!r} does not exist; expected a directory.")
    paths, searched = _search_catalogs(target_lang, None if directory is None else [directory])
    if not paths:
        raise ValueError(
            f"found no gettext catalog for en→{target_lang}; searched {searched}. Expected "
            f"at least one .mo file in a '{target_lang}/LC_MESSAGES' directory."
        )
    skipped: collections.Counter = collections.Counter()
    catalogs: dict[str, list[Pair]] = {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        # Same name in two directories = the same program's messages: one catalog.
        pairs = catalogs.setdefault(name, [])
        pairs.extend(_catalog_pairs(path, skipped))
    for name, pairs in catalogs.items():
        unique = list(dict.fromkeys(pairs))
        skipped["duplicate"] += len(pairs) - len(unique)
        catalogs[name] = unique
    sizes = {name: len(pairs) for name, pairs in catalogs.items() if pairs}
    if not sizes:
        raise ValueError(
            f"the {len(paths)} gettext catalogs found for en→{target_lang} under {searched} "
            f"gave no translation pairs (skipped: {dict(sorted(skipped.items()))}); expected "
            "catalogs with translated entries."
        )
    assigned = _assign_catalogs(sizes, validation_fraction, test_fraction, seed)
    splits: dict[str, list[Pair]] = {}
    seen_pairs: set[Pair] = set()
    train_sources: set[str] = set()
    # Train first, so that a message shared with a train catalog ("Cancel") is dropped from
    # the held-out splits: they must measure messages the model has not seen.
    for split in ("train", "test", "validation"):
        kept = []
        for name in assigned[split]:
            for pair in catalogs[name]:
                if pair in seen_pairs:
                    skipped["duplicate"] += 1
                elif split != "train" and pair[0] in train_sources:
                    skipped["source_seen_in_train"] += 1
                else:
                    seen_pairs.add(pair)
                    kept.append(pair)
        if split == "train":
            train_sources = {source for source, _ in kept}
        splits[split] = kept
    if not all(splits.values()):
        catalog_counts = {split: len(assigned[split]) for split in SPLITS}
        pair_counts = {split: len(splits[split]) for split in SPLITS}
        raise ValueError(
            f"the {len(sizes)} gettext catalogs with pairs for en→{target_lang} split into "
            f"{catalog_counts} catalogs and {pair_counts} pairs; expected at least one "
            "catalog and one pair in each split. Add catalogs or change "
            "validation_fraction, test_fraction or seed."
        )
    summary = {
        "catalogs": {split: sorted(assigned[split]) for split in SPLITS},
        "searched": searched,
        "skipped": dict(sorted(skipped.items())),
    }
    return splits, summary
