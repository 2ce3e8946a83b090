"""`--model=llama` through the command line: phases, the quality table, router capacity.

Split from tests/test_run_cli.py so that pytest-xdist can spread the slow CLI tests over
its workers (`--dist loadfile` keeps a file on one worker).
"""

import json

import pytest
from cli_runner import run_cli, write_corpus

LLAMA = [
    "--model=llama",
    "--mode=train",
    "--llama_preset=llama-tiny",
    "--tokenizer=byte",
    "--seq_len=16",
    "--batch_size=4",
    "--eval_windows=4",
]


def test_llama_phases_then_quality_table(tmp_path):
    glob = write_corpus(tmp_path / "corpus")
    data = f"--dataset=text:{glob}"
    base, routed = tmp_path / "base", tmp_path / "routed"
    result = run_cli(*LLAMA, data, "--phase=base", "--train_steps=6", f"--output_dir={base}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (base / "hf" / "config.json").exists() and (base / "hf" / "model.safetensors").exists()
    result = run_cli(
        *LLAMA,
        data,
        "--phase=routers",
        "--capacity=0.5",
        "--train_steps=8",
        f"--init_from={base / 'hf'}",
        f"--output_dir={routed}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(
        *LLAMA,
        data,
        "--phase=exits",
        "--train_steps=4",
        f"--init_from={routed / 'model.keras'}",
        f"--output_dir={routed}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli(
        *LLAMA,
        data,
        "--mode=eval",
        "--exit_depth=1.5",
        "--llama_capacities=0.5",
        f"--output_dir={routed}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = json.loads((routed / "llama_results.json").read_text())
    rows = table["rows"]
    assert [(r["capacity"], r["exits"]) for r in rows] == [(1.0, False), (0.5, False), (0.5, True)]
    for row in rows[1:]:
        assert row["perplexity"] > 0 and "perplexity_increase" in row
        assert row["measured_speedup"] > 0 and row["counted_speedup"] > 0


def test_llama_bad_phase_setup_fails_clearly(tmp_path):
    glob = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    result = run_cli(*LLAMA, f"--dataset=text:{glob}", "--phase=routers", f"--output_dir={out}")
    assert result.returncode != 0 and "needs --init_from" in result.stderr
    result = run_cli(
        *LLAMA,
        f"--dataset=text:{glob}",
        "--phase=routers",
        f"--init_from={tmp_path / 'nowhere'}",
        f"--output_dir={out}",
    )
    assert result.returncode != 0 and "does not exist" in result.stderr


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
