"""tests/conftest.py's strict skips: under `TOEX_FAIL_ON_SKIP=1` (CI) every skip fails.

Runs a throwaway suite with a copy of the real conftest in a child pytest, as CI runs it.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

MISSING_EXTRA = """
import pytest

pytest.importorskip("toex_no_such_module", reason="needs an extra that is not installed")


def test_never_runs():
    pass
"""

MIXED = """
import pytest


def test_passes():
    pass


def test_skips_at_run_time():
    pytest.skip("a run-time skip")


@pytest.mark.skipif(True, reason="a marker skip")
def test_skipped_by_marker():
    pass


@pytest.mark.xfail(reason="a known failure")
def test_expected_failure():
    raise AssertionError
"""


def _run_suite(tmp_path, *args, fail_on_skip):
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_missing_extra.py").write_text(MISSING_EXTRA)
    (tmp_path / "test_mixed.py").write_text(MIXED)
    env = {**os.environ, "KERAS_BACKEND": "numpy"}  # the conftest imports keras: keep it light
    env.pop("TOEX_FAIL_ON_SKIP", None)
    if fail_on_skip:
        env["TOEX_FAIL_ON_SKIP"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args, "."],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return run.returncode, run.stdout


def test_skips_stay_skips_by_default(tmp_path):
    code, out = _run_suite(tmp_path, "-p", "no:xdist", fail_on_skip=False)
    assert code == 0, out
    assert "1 passed, 3 skipped, 1 xfailed" in out
    assert "needs an extra that is not installed" in out  # -rs names the reason


def test_every_skip_fails_under_the_ci_variable(tmp_path):
    # As .ci/run runs it: two xdist workers, each module whole in one of them.
    code, out = _run_suite(tmp_path, "-n", "2", "--dist", "loadfile", fail_on_skip=True)
    assert code == 1, out
    # The module-level importorskip fails its collection; the two test skips fail too;
    # the xfail stays an xfail.
    assert "1 failed, 1 passed, 1 xfailed, 2 errors" in out
    for reason in ("needs an extra that is not installed", "a run-time skip", "a marker skip"):
        assert f"ALLOWED_SKIP_REASONS (tests/conftest.py): Skipped: {reason}" in out, out
