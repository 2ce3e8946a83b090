"""The GPT CLI on a model trained here: benchmark, calibrate, learned gates, core-parallel
decoding and export with saved_model_cli (`tests/cli/test_gpt_cli.py`: training, eval,
generation and bad input)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from cli_runner import TINY, run_cli, write_corpus


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
    """A tiny trained model, its tokenizer and corpus; tests copy it before writing."""
    root = tmp_path_factory.mktemp("trained")
    glob = write_corpus(root / "corpus")
    out = root / "out"
    result = _run(*TINY, f"--dataset=text:{glob}", f"--output_dir={out}", "--mode=train")
    assert result.returncode == 0, result.stderr[-3000:]
    return glob, out


def _copy(trained, tmp_path):
    glob, out = trained
    shutil.copytree(out, tmp_path / "out")
    return [*TINY, f"--dataset=text:{glob}", f"--output_dir={tmp_path / 'out'}"]


def test_benchmark_writes_rows_plot_and_table(trained_tiny, tmp_path):
    args = _copy(trained_tiny, tmp_path)
    result = _run(
        *args,
        "--mode=benchmark",
        "--prompt_length=8",
        "--benchmark_new_tokens=8",
        "--benchmark_batches=1,2",
        "--benchmark_thresholds=0.0,1.0",
        "--benchmark_repeats=1",
        "--benchmark_speculative=1:2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    assert (out / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((out / "benchmark.json").read_text())
    assert set(record) == {"model", "settings", "rows"}
    assert record["settings"]["batches"] == [1, 2] and record["model"]["num_layers"] == 2
    rows = record["rows"]
    # Per batch: full, 2 modes x 2 thresholds, 1 speculative setting.
    assert len(rows) == 2 * (1 + 4 + 1)
    fields = {
        "mode",
        "criterion",
        "threshold",
        "batch",
        "tokens_per_s",
        "full_tokens_per_s",
        "measured_speedup",
        "ideal_speedup",
        "realized_over_ideal",
        "avg_layers",
        "backend",
        "device",
    }
    for row in rows:
        assert fields <= set(row) and row["tokens_per_s"] > 0 and row["backend"] == "tensorflow"
        assert row["measured_speedup"] == pytest.approx(
            row["tokens_per_s"] / row["full_tokens_per_s"]
        )
    full = [r for r in rows if r["mode"] == "full"]
    assert [r["batch"] for r in full] == [1, 2]
    assert all(r["measured_speedup"] == 1.0 and r["avg_layers"] == 2.0 for r in full)
    never = [r for r in rows if r["threshold"] == 1.0]
    always = [r for r in rows if r["threshold"] == 0.0]
    assert {r["mode"] for r in never} == {"frozen", "lazy"}
    # Never exiting runs every layer and pays the checks; exiting at once runs one layer.
    assert all(r["avg_layers"] == 2.0 and r["ideal_speedup"] < 1.0 for r in never)
    assert all(r["avg_layers"] == 1.0 and r["ideal_speedup"] > 1.0 for r in always)
    spec = [r for r in rows if r["mode"] == "speculative"]
    assert len(spec) == 2 and all(r["draft_layer"] == 1 for r in spec)
    assert "realized" in result.stdout and "benchmark.json" in result.stdout
    log = [json.loads(line) for line in (out / "config_log.jsonl").read_text().splitlines()]
    assert log[-1]["flags"]["mode"] == "benchmark" and log[-1]["benchmark"] == rows

    too_long = _run(*args, "--mode=benchmark", "--prompt_length=30", "--benchmark_new_tokens=8")
    assert too_long.returncode != 0 and "Traceback" not in too_long.stderr
    assert "exceeds the model's max_length=32" in too_long.stderr, too_long.stderr[-2000:]


def test_calibrate_writes_the_chosen_threshold(trained_tiny, tmp_path):
    args = _copy(trained_tiny, tmp_path)
    common = [
        "--mode=calibrate",
        "--prompt_length=8",
        "--max_new_tokens=8",
        "--calibration_prompts=6",
        "--calibration_batch_size=3",
        "--calibration_thresholds=0.0,0.5",
        "--decode_mode=frozen",
    ]
    out = tmp_path / "out"
    for method, target in (("empirical", 0.5), ("ltt", 0.99)):
        result = _run(
            *args, *common, f"--calibration_method={method}", f"--target_agreement={target}"
        )
        assert result.returncode == 0, result.stderr[-3000:]
        record = json.loads((out / "calibration.json").read_text())
        assert set(record) == {"model", "settings", "calibration"}
        assert record["settings"]["mode"] == "frozen"
        assert record["settings"]["num_prompts"] == 6
        calibration = record["calibration"]
        assert calibration["method"] == method and calibration["target_agreement"] == target
        rows = calibration["rows"]
        assert [r["threshold"] for r in rows] == [1.0, 0.5, 0.0]
        assert rows[0]["agreement"] == 1.0 and rows[0]["avg_layers"] == 2.0
        assert rows[-1]["avg_layers"] == 1.0  # threshold 0: every token exits at layer 1
        assert calibration["threshold"] in (1.0, 0.5, 0.0)
        chosen = next(r for r in rows if r["threshold"] == calibration["threshold"])
        assert calibration["agreement"] == chosen["agreement"]
        assert f"Chosen threshold: {calibration['threshold']:g}" in result.stdout
        if method == "empirical":
            assert calibration["guaranteed"] is None
            assert calibration["agreement"] >= target
            cheaper = [r for r in rows if r["avg_layers"] < calibration["avg_layers"]]
            assert all(r["agreement"] < target for r in cheaper)
        else:
            # Six prompts cannot certify a 1% risk: Learn-then-Test falls back to 1.0.
            assert calibration["guaranteed"] is False and calibration["threshold"] == 1.0
            assert all(r["p_value"] is not None for r in rows)
    log = [json.loads(line) for line in (out / "config_log.jsonl").read_text().splitlines()]
    assert log[-1]["calibration"] == calibration


class _PieceTokenizer:
    """SentencePiece-like: "▁" marks a word start, and decoding drops the leading space."""

    pieces = ["▁the", "▁cat", "▁sat", "s", "▁on"]

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").lstrip(" ")


def test_generated_text_keeps_the_space_before_its_first_word():
    from toex_tf.data import ByteTokenizer
    from toex_tf.data.continuation import decode_continuation

    tokenizer = _PieceTokenizer()
    assert tokenizer.decode([2, 3]) == "sats"  # the wart: decoded alone, no leading space
    text, pieces = decode_continuation(tokenizer, [0, 1], [2, 3, 4])
    assert text == " sats on" and pieces == [" sat", "s", " on"]
    assert decode_continuation(tokenizer, [0], []) == ("", [])
    # Bytes of one character: the token that completes it carries it.
    byte = ByteTokenizer()
    text, pieces = decode_continuation(byte, byte.encode("h"), byte.encode("é!"))
    assert text == "é!" and pieces == ["", "é", "!"]


def test_train_gates_then_generate_with_the_learned_criterion(trained_tiny, tmp_path):
    args = _copy(trained_tiny, tmp_path)
    out = tmp_path / "out"
    trained = _run(*args, "--mode=train_gates", "--gate_windows=16", "--gate_epochs=2")
    assert trained.returncode == 0, trained.stderr[-3000:]
    report = json.loads((out / "gates.json").read_text())
    assert [int(layer) for layer in report["exit_layers"]] == [1]  # the tiny model's one gate
    assert "held-out AUC" in trained.stdout
    common = [*args, "--mode=generate", "--prompt=the cat", "--max_new_tokens=5"]
    for extra in (
        ["--decode_criterion=learned", "--decode_threshold=0.0"],
        ["--decode_criterion=saturation", "--decode_threshold=0.0", "--decision_layers=1"],
        ["--decode_criterion=max_prob", "--decode_threshold=0.5", "--threshold_decay=2"],
    ):
        generated = _run(*common, *extra)
        assert generated.returncode == 0, generated.stderr[-3000:]
        (record,) = json.loads((out / "generate.json").read_text())["results"]
        assert 0 < len(record["tokens"]) <= 5
        if "--decode_threshold=0.0" in extra:  # every token after the first leaves at 1
            assert all(t["exit_layer"] == 1 for t in record["tokens"][1:])
    bad = _run(*common, "--decision_layers=5")
    assert bad.returncode != 0 and "carry no exit head" in bad.stderr, bad.stderr[-2000:]
    assert "Traceback" not in bad.stderr


CORE_PARALLEL_PROCESS = """
import runpy, sys
sys.argv = ["toex_tf.run", *sys.argv[1:]]
try:
    runpy.run_module("toex_tf.run", run_name="__main__")  # what `python -m` runs
except SystemExit as stop:
    if stop.code:
        raise
import tensorflow as tf
from toex_tf.layers.linear import get_row_splits
threading = tf.config.threading
print("THREADS", threading.get_intra_op_parallelism_threads(),
      threading.get_inter_op_parallelism_threads(), get_row_splits())
"""


def test_core_parallel_generate_in_a_fresh_process(trained_tiny, tmp_path):
    args = _copy(trained_tiny, tmp_path)
    out = tmp_path / "out"
    common = [*args, "--mode=generate", "--prompt=the cat", "--max_new_tokens=6"]
    plain = _run(*common)
    assert plain.returncode == 0, plain.stderr[-3000:]
    want = json.loads((out / "generate.json").read_text())["results"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(
        [sys.executable, "-c", CORE_PARALLEL_PROCESS, *common, "--core_parallel"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The flag set TensorFlow's pools before its first op (one thread per op, one
    # inter-op thread per usable core) and split products into one row block per core.
    cores = len(os.sched_getaffinity(0))
    assert f"THREADS 1 {cores} {cores}" in result.stdout, result.stdout[-2000:]
    assert json.loads((out / "generate.json").read_text())["results"] == want


def test_export_then_saved_model_cli_show_and_run(trained_tiny, tmp_path):
    args = _copy(trained_tiny, tmp_path)
    export_dir = tmp_path / "exported"
    result = _run(*args, "--mode=export", f"--export_dir={export_dir}", "--decision_layers=1")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed["saved_model"] == str(export_dir)
    assert "generate_text" in printed["signatures"]  # the byte tokenizer goes into the graph
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    shown = subprocess.run(
        [cli, "show", "--dir", str(export_dir), "--all"], capture_output=True, text=True
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "signature_def['generate']" in shown.stdout and "max_new_tokens" in shown.stdout

    def saved_model_cli_run(signature, input_exprs):
        ran = subprocess.run(
            [
                cli, "run", "--dir", str(export_dir), "--tag_set", "serve",
                "--signature_def", signature, "--input_exprs", input_exprs,
            ],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert ran.returncode == 0, ran.stderr[-2000:]
        return ran

    # Text in, text out, through the command-line client: the text, token ids and exit
    # layers it prints equal this process's call of the same signature.
    ran = saved_model_cli_run(
        "generate_text", "prompt=['The ', 'Once'];max_new_tokens=6;threshold=0.5;mode='lazy'"
    )
    import tensorflow as tf  # noqa: PLC0415

    from toex_tf.export import generate_text_with_export  # noqa: PLC0415

    loaded = tf.saved_model.load(str(export_dir))
    texts, tokens, exits = generate_text_with_export(loaded, ["The ", "Once"], 6, 0.5, "lazy")
    assert any(texts)
    for text in texts:  # saved_model_cli prints the string tensor's bytes
        assert repr(text.encode()) in ran.stdout, (text, ran.stdout[-800:])
    printed = ran.stdout.replace("\n", " ")
    for name, values in (("token_ids", tokens), ("exit_layers", exits)):
        rows = r"\]\s*\[".join(r"\s+".join(str(v) for v in row) for row in values)
        assert re.search(rf"{name}.*\[\[\s*{rows}\s*\]\]", printed), (name, rows, printed[-800:])


def _run(*args, timeout=600):
    return run_cli(*args, timeout=timeout)
