"""`run_cli`: `python -m toex_tf.run ARGS` in a child process, for the CLI tests
(`tests/` is on `sys.path` through `tests/conftest.py`)."""

import os
import subprocess
import sys


def run_cli(*args, timeout=600, cwd=None):
    """Runs the CLI with `args`; returns the `subprocess.CompletedProcess` (text output)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run(
        [sys.executable, "-m", "toex_tf.run", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )
