"""Helpers shared by the serving tests."""

import json
import os
import subprocess
import sys

import numpy as np

# The start of a fresh-process script: toex_tf cannot be imported there (checked), only
# TensorFlow, as on a serving host.
WITHOUT_TOEX_TF = """
import json, sys
sys.modules["toex_tf"] = None  # toex_tf must not be importable here
try:
    import toex_tf  # noqa
    raise SystemExit("toex_tf was importable")
except ImportError:
    pass
import tensorflow as tf
"""


def right_padded(prompts):
    """Right-padded int32 ids and lengths of a list of id lists."""
    ids = np.zeros((len(prompts), max(map(len, prompts))), "int32")
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
    return ids, np.array([len(p) for p in prompts], "int32")


def fresh_process(script, cwd, *args):
    """Runs `script` in a new Python (no PYTHONPATH); returns the JSON after `RESULT `."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])
