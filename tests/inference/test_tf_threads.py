"""`use_core_parallel_decoding`: thread pools and row splits, in fresh processes (TensorFlow
fixes its thread pools once per process)."""

import os
import subprocess
import sys
import textwrap

import pytest

from toex_tf.inference.tf_threads import use_core_parallel_decoding


def _run(code, **environment):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **environment}
    for name in ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        if name not in environment:
            env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_sets_the_pools_and_the_row_splits_before_tensorflow_starts():
    out = _run("""
        from toex_tf.inference.tf_threads import use_core_parallel_decoding
        from toex_tf.layers.linear import get_row_splits
        assert use_core_parallel_decoding(2) == 2
        import tensorflow as tf
        threading = tf.config.threading
        print(threading.get_intra_op_parallelism_threads(),
              threading.get_inter_op_parallelism_threads(), get_row_splits())
        tf.constant(1.0) + 1.0  # the pools are fixed now
        assert use_core_parallel_decoding(2) == 2  # the same setting again is fine
        try:
            use_core_parallel_decoding(3)
        except RuntimeError as error:
            print("refused:", error)
    """)
    lines = out.splitlines()
    assert lines[0] == "1 2 2"
    assert lines[1].startswith("refused: use_core_parallel_decoding must run before")
    assert "TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=3" in lines[1]


def test_the_environment_setting_counts_after_tensorflow_started():
    out = _run(
        """
        import tensorflow as tf
        tf.constant(1.0) + 1.0
        from toex_tf.inference.tf_threads import use_core_parallel_decoding
        from toex_tf.layers.linear import get_row_splits
        print(use_core_parallel_decoding(2), get_row_splits())
        """,
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="2",
    )
    assert out.split() == ["2", "2"]


@pytest.mark.parametrize("cores", [0, -2, 1.5, True, "2"])
def test_bad_core_counts_are_named(cores):
    with pytest.raises(ValueError, match="cores must be an int >= 1"):
        use_core_parallel_decoding(cores)
