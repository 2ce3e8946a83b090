"""Shared test setup: quiet TensorFlow logs, a fixed seed for every test, and strict skips.

Strict skips: with `TOEX_FAIL_ON_SKIP=1` in the environment (`.ci/run` sets it), a skipped
test or module counts as a failure, unless its reason contains one of
`ALLOWED_SKIP_REASONS`. A missing optional package (`pytest.importorskip`, say torch
without the `parity` extra) is a skip on a developer's machine and a failure in CI, where
every extra is installed. The hooks rewrite each report where it is made, so they work
the same in pytest-xdist workers. Expected failures (`xfail`) are left alone.
"""

import os
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402

# TensorFlow only when Keras runs on it: the strict-skip test's child suites run this file
# on the light numpy backend, and importing TensorFlow costs each process seconds.
tf = None
if keras.backend.backend() == "tensorflow":
    import tensorflow as tf  # noqa: E402

FAIL_ON_SKIP_VARIABLE = "TOEX_FAIL_ON_SKIP"
# Skips that CI accepts; a reason containing one of these stays a skip. None so far.
ALLOWED_SKIP_REASONS: tuple[str, ...] = ()


SEED = 1234


@pytest.fixture(scope="session", autouse=True)
def _tensorflow_seed():
    if tf is not None:
        tf.random.set_seed(SEED)


@pytest.fixture(autouse=True)
def _seed():
    """`keras.utils.set_random_seed(SEED)` before each test (Python, NumPy and Keras's
    global seed generator), without TensorFlow's `tf.random.set_seed`: that one also
    clears the eager kernel cache, so each compiled or loaded function (an export's
    decode loop) was instantiated and optimised again, about 5 s, in every test. toex_tf
    draws random numbers through Keras's stateless ops, which TF's global seed does not
    affect; it is set once per session (`_tensorflow_seed`)."""
    if tf is None:
        keras.utils.set_random_seed(SEED)
        return
    with mock.patch.object(tf.random, "set_seed", lambda seed: None):
        keras.utils.set_random_seed(SEED)


def _skip_reason(report) -> str:
    if isinstance(report.longrepr, tuple):  # (path, line, "Skipped: reason")
        return str(report.longrepr[2])
    return str(report.longrepr)


def _fail_unexpected_skip(report) -> None:
    if os.environ.get(FAIL_ON_SKIP_VARIABLE) != "1" or not report.skipped:
        return
    if hasattr(report, "wasxfail"):
        return
    reason = _skip_reason(report)
    if any(allowed in reason for allowed in ALLOWED_SKIP_REASONS):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"{FAIL_ON_SKIP_VARIABLE}=1 fails every skip whose reason is not in "
        f"ALLOWED_SKIP_REASONS (tests/conftest.py): {reason}"
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


# The longest test files (measured, on 2 cores), started first: `--dist loadfile` hands
# files to the two xdist workers in collection order, so a long file collected last would
# run alone at the end while the other worker idles.
LONGEST_FIRST = (
    "tests/cli/test_multi_worker.py",
    "tests/test_kaggle_notebook.py",
    "tests/serving/test_export_text.py",
    "tests/cli/test_gpt_cli.py",
    "tests/serving/test_export.py",
    "tests/test_run_cli.py",
    "tests/test_readme.py",
    "tests/cli/test_every_family.py",
    "tests/training/test_lora_exits.py",
    "tests/inference/test_decode_quality.py",
    "tests/cli/test_seq2seq_cli.py",
    "tests/serving/test_export_translation.py",
)


def pytest_collection_modifyitems(config, items):
    root = str(config.rootpath)

    def rank(item):
        path = os.path.relpath(str(item.path), root)
        return LONGEST_FIRST.index(path) if path in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
