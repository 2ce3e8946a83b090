"""`--model=llama` through the command line: phases, the quality table, router capacity.

Split from tests/test_run_cli.py so that pytest-xdist can spread the slow CLI tests over
its workers (`--dist loadfile` keeps a file on one worker). The phases end to end (base and
routers by two workers, then exits and the quality table) are in test_multi_worker.py.
"""

import json

import pytest
from cli_runner import LLAMA_TINY, cli_error, run_cli, write_corpus

LLAMA = LLAMA_TINY


def test_llama_bad_phase_setup_fails_clearly(tmp_path):
    # In this process: both stop before TensorFlow works.
    glob = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    error = cli_error(*LLAMA, f"--dataset=text:{glob}", "--phase=routers", f"--output_dir={out}")
    assert "needs --init_from" in error
    error = cli_error(
        *LLAMA,
        f"--dataset=text:{glob}",
        "--phase=routers",
        f"--init_from={tmp_path / 'nowhere'}",
        f"--output_dir={out}",
    )
    assert "does not exist" in error


def test_llama_target_speedup_searches_the_router_capacity(tmp_path):
    import keras  # noqa: PLC0415

    from toex_tf.data import ByteTokenizer  # noqa: PLC0415
    from toex_tf.models import build_llama  # noqa: PLC0415

    glob = write_corpus(tmp_path / "corpus", docs=8)
    out = tmp_path / "out"
    out.mkdir()
    keras.utils.set_random_seed(0)
    build_llama("llama-tiny", vocab_size=257, capacity=0.5).save(out / "model.keras")
    ByteTokenizer().save(str(out / "tokenizer"))
    target = 1.05
    result = run_cli(
        "--model=llama",
        "--mode=benchmark",
        f"--target_speedup={target}",
        "--tokenizer=byte",
        "--seq_len=16",
        f"--dataset=text:{glob}",
        f"--output_dir={out}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    search = json.loads((out / "capacity_search.json").read_text())
    assert search["target_speedup"] == target
    # Replay the bisection over [0.1, 1] from the measured speedups: each trial halves the
    # interval on the side its measurement says, and the answer is the largest capacity
    # that reached the target (None when none did).
    low, high, reached = 0.1, 1.0, []
    for trial in search["trials"]:
        assert trial["capacity"] == pytest.approx((low + high) / 2)
        assert trial["measured_speedup"] > 0
        if trial["measured_speedup"] >= target:
            low = trial["capacity"]
            reached.append(trial["capacity"])
        else:
            high = trial["capacity"]
    assert len(search["trials"]) == 5
    assert search["capacity"] == (max(reached) if reached else None)
    log = [json.loads(line) for line in (out / "config_log.jsonl").read_text().splitlines()]
    assert log[-1]["search"] == search
