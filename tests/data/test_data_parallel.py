"""Tests for toex_tf.data.parallel: gettext, files, tsv and TFDS sentence pairs."""

import json
import locale
import os
import struct
import sys
import types

import pytest

from toex_tf.data import gettext_catalogs as catalogs_module
from toex_tf.data.parallel import (
    ParallelCorpus,
    check_language,
    gettext_catalogs,
    load_parallel,
    read_catalog,
)

_UTF8_HEADER = "Content-Type: text/plain; charset=UTF-8\n"


def write_mo(path, entries):
    """Compiles `entries` (msgid -> msgstr) into a GNU .mo file, with a UTF-8 header.

    A msgid may hold a context (`"ctx\\x04msgid"`) or plural forms (`"one\\x00many"`, with
    msgstr `"form0\\x00form1"`), exactly as they are stored in the binary format.
    """
    entries = {"": _UTF8_HEADER, **entries}
    keys = sorted(entries, key=lambda key: key.encode())  # GNU tools sort by msgid bytes.
    count = len(keys)
    originals_offset, translations_offset = 28, 28 + 8 * count
    data_offset = 28 + 16 * count
    tables = {"originals": [], "translations": []}
    blob = b""
    for table, strings in (
        ("originals", [key.encode() for key in keys]),
        ("translations", [entries[key].encode() for key in keys]),
    ):
        for string in strings:
            tables[table].append(struct.pack("<2I", len(string), data_offset + len(blob)))
            blob += string + b"\0"
    header = struct.pack(
        "<7I", 0x950412DE, 0, count, originals_offset, translations_offset, 0, data_offset
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as file:
        file.write(header + b"".join(tables["originals"] + tables["translations"]) + blob)
    return str(path)


def catalog_entries(name, count=10):
    """`count` distinct messages, each target naming its catalog so tests can trace it."""
    return {f"Message {name} number {i}": f"Mesajul {name} numărul {i}" for i in range(count)}


@pytest.fixture
def locale_dir(tmp_path):
    """A locale tree with 12 small Romanian catalogs sharing a 'Cancel' message."""
    messages = tmp_path / "locale" / "ro" / "LC_MESSAGES"
    for index in range(12):
        name = f"program{index:02d}"
        # The same source with a different translation in every catalog: held out, it must
        # be dropped as seen in train.
        entries = {**catalog_entries(name), "Cancel": f"Anulează {index}"}
        write_mo(messages / f"{name}.mo", entries)
    return str(tmp_path / "locale")


# read_catalog ----------------------------------------------------------------------------


def test_write_mo_round_trips_through_read_catalog(tmp_path):
    path = write_mo(
        tmp_path / "a.mo",
        {"Open": "Deschide", "menu\x04Close": "Închide", "file\x00files": "fișier\x00fișiere"},
    )
    catalog = read_catalog(path)
    assert catalog[""] == _UTF8_HEADER
    assert catalog["Open"] == "Deschide"
    assert catalog["menu\x04Close"] == "Închide"
    assert catalog[("file", 0)] == "fișier" and catalog[("file", 1)] == "fișiere"


def test_read_catalog_random_bytes_is_a_clear_error(tmp_path):
    path = tmp_path / "random.mo"
    path.write_bytes(bytes(range(7, 250, 3)) * 3)
    with pytest.raises(ValueError, match="is corrupt or not a .mo file") as error:
        read_catalog(str(path))
    assert str(path) in str(error.value)
    assert "expected a compiled GNU gettext catalog" in str(error.value)


def test_read_catalog_truncated_file_is_a_clear_error(tmp_path):
    path = write_mo(tmp_path / "whole.mo", catalog_entries("whole"))
    with open(path, "rb") as file:
        data = file.read()
    for length in (2, len(data) // 2):  # Inside the header, then inside the strings.
        truncated = tmp_path / f"truncated{length}.mo"
        truncated.write_bytes(data[:length])
        with pytest.raises(ValueError, match="is corrupt or not a .mo file"):
            read_catalog(str(truncated))


def test_read_catalog_missing_file(tmp_path):
    with pytest.raises(ValueError, match="'.*missing.mo' is not a file"):
        read_catalog(str(tmp_path / "missing.mo"))


def test_corrupt_catalog_fails_load_parallel_naming_it(locale_dir):
    bad = os.path.join(locale_dir, "ro", "LC_MESSAGES", "broken.mo")
    with open(bad, "wb") as file:
        file.write(b"not a catalog at all")
    with pytest.raises(ValueError, match="broken.mo' is corrupt"):
        load_parallel(f"gettext:{locale_dir}")


# check_language --------------------------------------------------------------------------


def test_check_language_normalises():
    assert check_language("target_lang", "RO") == "ro"
    assert check_language("target_lang", " en ") == "en"
    assert check_language("target_lang", "pt_br") == "pt_BR"  # The locale directory name.
    assert check_language("target_lang", "sr@latin") == "sr@latin"


def test_check_language_unknown_code():
    assert "xx" not in locale.locale_alias  # So the test means what it says on any machine.
    with pytest.raises(ValueError) as error:
        check_language("source_lang", "xx")
    assert str(error.value) == (
        "source_lang 'xx' is not a known language code; expected an ISO 639 code such as "
        "'en' or 'ro'."
    )


@pytest.mark.parametrize("code", ["", "english", "r", "ro-RO-x", "zz_ZZ"])
def test_check_language_rejects_malformed(code):
    with pytest.raises(ValueError, match="target_lang .* is not a known language code"):
        check_language("target_lang", code)


def test_check_language_rejects_non_string():
    with pytest.raises(TypeError, match="target_lang must be a str, got int"):
        check_language("target_lang", 7)


def test_load_parallel_rejects_same_languages_and_bad_arguments(locale_dir):
    with pytest.raises(ValueError, match="both 'ro'"):
        load_parallel(f"gettext:{locale_dir}", source_lang="ro", target_lang="RO")
    with pytest.raises(ValueError, match="target_lang 'zz'"):
        load_parallel(f"gettext:{locale_dir}", target_lang="zz")
    with pytest.raises(ValueError, match="test_fraction must be strictly between 0 and 1"):
        load_parallel(f"gettext:{locale_dir}", test_fraction=0.0)
    with pytest.raises(ValueError, match="expected below 1"):
        load_parallel(f"gettext:{locale_dir}", validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValueError, match="max_pairs must be None or a positive int"):
        load_parallel(f"gettext:{locale_dir}", max_pairs=0)


@pytest.mark.parametrize("dataset", ["wikipedia", "", "gettext:", "files:", "tsv:", "tfds:"])
def test_load_parallel_unknown_dataset_lists_the_forms(dataset):
    with pytest.raises(ValueError, match="is not recognised") as error:
        load_parallel(dataset)
    assert "'files:SOURCE_PATH,TARGET_PATH'" in str(error.value)


# gettext: catalogs and skip rules --------------------------------------------------------


def test_gettext_requires_english_source(locale_dir):
    with pytest.raises(ValueError, match="gettext msgids are English") as error:
        load_parallel(f"gettext:{locale_dir}", source_lang="de")
    assert "source_lang='en'" in str(error.value)


def test_skip_rules_context_and_dedupe(locale_dir):
    entries = {
        "file\x00files": "fișier\x00fișiere",  # plural: 2 forms
        "Not translated yet": "",  # untranslated
        "  Blank msgstr  ": "   ",  # untranslated after stripping
        "GTK+": " GTK+ ",  # identical after stripping
        "%s": "%s",  # identical (reason checked before no_letters)
        "%d: %s": "%d - %s",  # no_letters
        "%1$s / %(name)s {0} {count:>4} %%": "x",  # no_letters
        "…": "...",  # no_letters
        "menu\x04Open": "Deschide",  # context stripped
        "a\x04Save": "Salvează",  # duplicate after stripping the contexts
        "b\x04Save": "Salvează",
        "%s (system)": "%s (sistem)",  # letters outside the specifier: kept
        "  Line one\nline two ": "Rândul unu\nrândul doi",  # inner newline kept
    }
    write_mo(os.path.join(locale_dir, "ro", "LC_MESSAGES", "skips.mo"), entries)
    corpus = load_parallel(f"gettext:{locale_dir}")
    skipped = corpus.summary["skipped"]
    assert skipped["header"] == 13  # Each of the 13 catalogs has one.
    assert skipped["plural"] == 2
    assert skipped["untranslated"] == 2
    assert skipped["identical"] == 2
    assert skipped["no_letters"] == 3
    everything = corpus.train + corpus.validation + corpus.test
    assert len(everything) == len(set(everything))
    kept = {pair for pair in everything if not pair[0].startswith(("Message", "Cancel"))}
    assert kept == {
        ("Open", "Deschide"),
        ("Save", "Salvează"),
        ("%s (system)", "%s (sistem)"),
        ("Line one\nline two", "Rândul unu\nrândul doi"),
    }
    # One 'Save' pair dropped inside the catalog, plus none across catalogs here.
    assert skipped["duplicate"] == 1


def test_identical_pairs_across_catalogs_are_kept_once(tmp_path):
    messages = tmp_path / "ro" / "LC_MESSAGES"
    for name in ("one", "two", "three", "four"):
        write_mo(messages / f"{name}.mo", {**catalog_entries(name), "Quit": "Ieșire"})
    corpus = load_parallel(f"gettext:{tmp_path}", test_fraction=0.25, validation_fraction=0.25)
    everything = corpus.train + corpus.validation + corpus.test
    assert everything.count(("Quit", "Ieșire")) == 1
    assert ("Quit", "Ieșire") in corpus.train  # Train wins, so held-out stays unseen.
    assert corpus.summary["skipped"]["duplicate"] == 3


def test_split_is_by_catalog_and_held_out_sources_are_unseen(locale_dir):
    corpus = load_parallel(f"gettext:{locale_dir}", validation_fraction=0.1, test_fraction=0.2)
    catalogs = corpus.summary["catalogs"]
    assert all(catalogs[split] for split in ("train", "validation", "test"))
    names = catalogs["train"] + catalogs["validation"] + catalogs["test"]
    assert sorted(names) == [f"program{index:02d}" for index in range(12)]  # Each once.
    train_sources = {source for source, _ in corpus.train}
    for split in ("validation", "test"):
        pairs = getattr(corpus, split)
        assert pairs, split
        assert not {source for source, _ in pairs} & train_sources
        # Every held-out message comes from a catalog assigned to that split.
        assert {target.split()[1] for _, target in pairs} <= set(catalogs[split])
    assert {target.split()[1] for source, target in corpus.train if source != "Cancel"} == set(
        catalogs["train"]
    )
    held_out_catalogs = len(catalogs["validation"]) + len(catalogs["test"])
    assert corpus.summary["skipped"]["source_seen_in_train"] == held_out_catalogs  # 'Cancel'
    assert corpus.summary["pairs"] == {
        split: len(getattr(corpus, split)) for split in ("train", "validation", "test")
    }
    assert len(corpus.test) >= 0.2 * 12 * 10  # At least test_fraction of the messages.
    json.dumps(corpus.summary)  # JSON-serializable.


def test_split_is_deterministic_and_depends_on_seed(locale_dir):
    first = load_parallel(f"gettext:{locale_dir}", seed=3)
    assert first == load_parallel(f"gettext:{locale_dir}", seed=3)
    assert isinstance(first, ParallelCorpus)
    others = [load_parallel(f"gettext:{locale_dir}", seed=seed).summary for seed in range(4)]
    assert len({json.dumps(summary["catalogs"]) for summary in others}) > 1


def test_a_catalog_with_most_pairs_stays_in_train(locale_dir):
    write_mo(os.path.join(locale_dir, "ro", "LC_MESSAGES", "huge.mo"), catalog_entries("huge", 200))
    for seed in range(8):
        corpus = load_parallel(f"gettext:{locale_dir}", seed=seed, test_fraction=0.3)
        assert "huge" in corpus.summary["catalogs"]["train"]


def test_same_catalog_name_in_two_directories_is_one_catalog(tmp_path):
    for root in ("first", "second"):
        for name in ("alpha", "beta", "gamma"):
            entries = catalog_entries(f"{root}{name}", 3)
            write_mo(tmp_path / root / "ro" / "LC_MESSAGES" / f"{name}.mo", entries)
    corpus = load_parallel(f"gettext:{tmp_path}", test_fraction=0.3, validation_fraction=0.3)
    assert sorted(sum(corpus.summary["catalogs"].values(), [])) == ["alpha", "beta", "gamma"]
    assert sum(corpus.summary["pairs"].values()) == 18


def test_too_few_catalogs_to_split(tmp_path):
    for name in ("alpha", "beta"):
        write_mo(tmp_path / "ro" / "LC_MESSAGES" / f"{name}.mo", catalog_entries(name))
    with pytest.raises(ValueError, match="the 2 gettext catalogs with pairs for en→ro"):
        load_parallel(f"gettext:{tmp_path}")


def test_catalogs_without_pairs_name_the_directory_and_skips(tmp_path):
    for name in ("alpha", "beta", "gamma"):
        write_mo(tmp_path / "ro" / "LC_MESSAGES" / f"{name}.mo", {"Hello": "", "OK": "OK"})
    with pytest.raises(ValueError, match="gave no translation pairs") as error:
        load_parallel(f"gettext:{tmp_path}")
    message = str(error.value)
    assert os.path.join(str(tmp_path), "ro", "LC_MESSAGES") in message
    assert "'untranslated': 3" in message and "'identical': 3" in message


def test_no_catalog_names_the_pair_and_the_searched_directories(tmp_path):
    with pytest.raises(ValueError, match="found no gettext catalog for en→ro") as error:
        load_parallel(f"gettext:{tmp_path}")
    assert str(tmp_path) in str(error.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_parallel(f"gettext:{tmp_path / 'missing'}")


def test_default_search_covers_system_and_site_packages(tmp_path, monkeypatch):
    system, site_packages = tmp_path / "system", tmp_path / "site"
    monkeypatch.setattr(catalogs_module, "_SYSTEM_LOCALE_DIR", str(system))
    monkeypatch.setattr(catalogs_module, "_site_directories", lambda: [str(site_packages)])
    with pytest.raises(ValueError, match="en→ro") as error:
        load_parallel("gettext")
    assert str(system) in str(error.value) and str(site_packages) in str(error.value)

    found = [
        write_mo(system / "ro" / "LC_MESSAGES" / "coreutils.mo", {"a": "b"}),
        write_mo(site_packages / "pkg" / "locale" / "ro" / "LC_MESSAGES" / "pkg.mo", {"a": "b"}),
    ]
    write_mo(system / "de" / "LC_MESSAGES" / "coreutils.mo", {"a": "b"})
    write_mo(site_packages / "pkg" / "locale" / "ro_RO" / "LC_MESSAGES" / "pkg.mo", {"a": "b"})
    write_mo(site_packages / "pkg" / "locale" / "de" / "LC_MESSAGES" / "pkg.mo", {"a": "b"})
    os.symlink(found[0], system / "ro" / "LC_MESSAGES" / "alias.mo")  # Counted once.
    assert gettext_catalogs("RO") == sorted(os.path.realpath(path) for path in found)


def test_directory_search_falls_back_to_all_catalogs_of_the_language(tmp_path):
    ro_catalog = write_mo(tmp_path / "app" / "ro" / "LC_MESSAGES" / "app.mo", {"a": "b"})
    loose_catalog = write_mo(tmp_path / "loose" / "messages.mo", {"a": "b"})
    write_mo(tmp_path / "app" / "de" / "LC_MESSAGES" / "app.mo", {"a": "b"})
    assert gettext_catalogs("ro", [str(tmp_path)]) == sorted([ro_catalog, loose_catalog])
    # With DIR/ro/LC_MESSAGES present, only that directory counts.
    assert gettext_catalogs("ro", [str(tmp_path / "app")]) == [ro_catalog]


# files and tsv ---------------------------------------------------------------------------


def write_lines(path, lines, newline="\n"):
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return str(path)


def test_files_form_splits_deterministically(tmp_path):
    sources = [f"sentence {i}" for i in range(20)]
    targets = [f"propoziția {i}" for i in range(20)]
    source_path = write_lines(tmp_path / "train.en", sources)
    target_path = write_lines(tmp_path / "train.ro", [f"  {t} " for t in targets], "\r\n")
    dataset = f"files:{source_path},{target_path}"
    corpus = load_parallel(dataset, seed=1)
    assert (len(corpus.train), len(corpus.validation), len(corpus.test)) == (17, 1, 2)
    assert sorted(corpus.train + corpus.validation + corpus.test) == sorted(zip(sources, targets))
    assert corpus == load_parallel(dataset, seed=1)
    assert corpus.test != load_parallel(dataset, seed=2).test
    assert load_parallel(dataset, max_pairs=5).summary["pairs"] == {
        "train": 5,
        "validation": 1,
        "test": 2,
    }


def test_files_with_different_line_counts(tmp_path):
    source_path = write_lines(tmp_path / "a.en", ["one", "two", "three"])
    target_path = write_lines(tmp_path / "a.ro", ["unu", "doi"])
    with pytest.raises(ValueError) as error:
        load_parallel(f"files:{source_path},{target_path}")
    message = str(error.value)
    assert source_path in message and target_path in message
    assert "has 3 lines" in message and "has 2" in message


def test_files_form_needs_two_paths_and_existing_files(tmp_path):
    with pytest.raises(ValueError, match="does not name two files"):
        load_parallel("files:only_one.txt")
    with pytest.raises(ValueError, match="could not read"):
        load_parallel(f"files:{tmp_path / 'a'},{tmp_path / 'b'}")


def test_tsv_form_splits_on_the_first_tab_and_skips_empty_pairs(tmp_path):
    lines = ["Hello\tSalut", "", "Tab\tinside\ttarget", "Empty\t ", "Bye\tLa revedere"]
    lines += ["Hello\tSalut", "Yes\tDa"]
    path = write_lines(tmp_path / "pairs.tsv", lines)
    corpus = load_parallel(f"tsv:{path}")
    assert sorted(corpus.train + corpus.validation + corpus.test) == [
        ("Bye", "La revedere"),
        ("Hello", "Salut"),
        ("Tab", "inside\ttarget"),
        ("Yes", "Da"),
    ]
    assert corpus.summary["skipped"] == {"duplicate": 1, "empty": 1}


def test_tsv_line_without_tab_names_path_and_line(tmp_path):
    path = write_lines(tmp_path / "pairs.tsv", ["a\tb", "", "no tab on this line " * 10])
    with pytest.raises(ValueError, match="line 3 of") as error:
        load_parallel(f"tsv:{path}")
    assert path in str(error.value) and "'no tab on this line" in str(error.value)


def test_fewer_than_three_pairs(tmp_path):
    path = write_lines(tmp_path / "pairs.tsv", ["a\tb", "c\td"])
    with pytest.raises(ValueError, match="has 2 usable pairs; expected at least 3"):
        load_parallel(f"tsv:{path}")


# tfds ------------------------------------------------------------------------------------


def test_tfds_unprepared_fails_fast_naming_dataset_and_data_dir(tmp_path):
    # download=False (the default): TFDS looks in the empty data_dir and stops there.
    with pytest.raises(ValueError, match="'wmt16_translate/ro-en'") as error:
        load_parallel("tfds:wmt16_translate/ro-en", data_dir=str(tmp_path))
    message = str(error.value)
    assert str(tmp_path) in message
    assert f"tfds build wmt16_translate/ro-en --data_dir={tmp_path}" in message
    assert "download=True" in message
    assert "\n" not in message  # Only the first line of TFDS's message.


def fake_tfds(examples):
    """A stand-in `tensorflow_datasets` serving `examples[split]` as the dataset."""
    module = types.ModuleType("tensorflow_datasets")
    module.calls = []

    def load(name, split, data_dir, download, try_gcs):
        module.calls.append((name, split, data_dir, download, try_gcs))
        rows = examples[split.split("[")[0]]
        return types.SimpleNamespace(element_spec=dict.fromkeys(rows[0]), rows=rows)

    module.load = load
    module.as_numpy = lambda dataset: iter(dataset.rows)
    return module


def test_tfds_uses_its_own_splits_and_language_keys(monkeypatch):
    examples = {
        split: [{"en": f"{split} {i}".encode(), "ro": f"{split} ro {i}".encode()} for i in range(3)]
        for split in ("train", "validation", "test")
    }
    module = fake_tfds(examples)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
    corpus = load_parallel("tfds:wmt16_translate/ro-en", data_dir="/data", max_pairs=2)
    assert corpus.train == [("train 0", "train ro 0"), ("train 1", "train ro 1")]
    assert corpus.test == [("test 0", "test ro 0"), ("test 1", "test ro 1")]
    assert module.calls[0] == ("wmt16_translate/ro-en", "train[:2]", "/data", False, False)

    with pytest.raises(ValueError, match=r"target_lang 'de' is not a feature.*\['en', 'ro'\]"):
        load_parallel("tfds:wmt16_translate/ro-en", target_lang="de")
