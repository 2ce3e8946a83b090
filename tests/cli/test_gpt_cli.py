"""The GPT CLI end to end on tiny data (train, eval, generate), and its errors for bad
flags, data, models and checkpoints."""

import json
import os

import pytest
from cli_runner import TINY, cli_error, run_cli, run_cli_on_terminal, write_corpus

from toex_tf.analysis.tf_summaries import threshold_step


def test_train_and_eval_writes_model_results_and_logs(tmp_path):
    glob = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    # The one CLI run that trains with XLA, the default.
    result = _run(*TINY, f"--dataset=text:{glob}", f"--output_dir={out}", "--jit_compile")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "model.keras").exists() and (out / "tokenizer" / "tokenizer.json").exists()
    assert os.listdir(out / "tensorboard")
    assert (out / "exit_curve.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"config", "baseline", "sweeps"}
    assert set(results["baseline"]) == {"perplexity", "accuracy", "num_layers"}
    assert len(results["sweeps"]) == 3 * 3
    keys = {
        "criterion",
        "threshold",
        "avg_exit_layer",
        "exit_rate",
        "exit_distribution",
        "savings",
        "ideal_speedup",
        "perplexity",
        "accuracy",
    }
    for row in results["sweeps"]:
        assert set(row) == keys
        assert sum(row["exit_distribution"].values()) == pytest.approx(1.0)
    zero = [r for r in results["sweeps"] if r["threshold"] == 0.0]
    assert all(r["exit_rate"] > 0.5 for r in zero)
    never = [r for r in results["sweeps"] if r["threshold"] == 1.0]
    assert all(
        r["exit_rate"] == 0 and r["perplexity"] == results["baseline"]["perplexity"] for r in never
    )
    assert results["config"]["flags"]["train_steps"] == 6
    assert "criterion" in result.stdout and "full depth" in result.stdout
    # Progress in a log: plain lines, no terminal redraws (Keras's bar would write one line
    # of backspaces).
    assert "[exit sweep] 8/8 (100%)" in result.stdout and "[training]" in result.stdout
    assert "[data] 4/4 (100%), " in result.stdout
    assert "\x08" not in result.stdout and max(map(len, result.stdout.splitlines())) < 400
    _check_sweep_events(out / "tensorboard", results)
    log = [json.loads(line) for line in (out / "config_log.jsonl").read_text().splitlines()]
    assert len(log) == 1 and log[0]["results"]["baseline"] == results["baseline"]

    # Generation: text in, text and per-token exit layers out (JSON on stdout and on disk).
    for mode in ("lazy", "speculative"):
        generated = _run(
            *TINY,
            f"--output_dir={out}",
            "--mode=generate",
            "--prompt=the cat",
            "--max_new_tokens=5",
            f"--decode_mode={mode}",
            "--decode_threshold=0.0",
        )
        assert generated.returncode == 0, generated.stderr[-3000:]
        record = json.loads((out / "generate.json").read_text())
        assert json.loads(generated.stdout[generated.stdout.index("{") :]) == record
        (result,) = record["results"]
        assert record["settings"]["mode"] == mode and 0 < len(result["tokens"]) <= 5
        assert all(1 <= t["exit_layer"] <= 2 for t in result["tokens"])
        assert result["text"] == "".join(t["token"] for t in result["tokens"])
    for prompt, message in (("", "prompts[0] is empty"), ("x" * 40, "max_length")):
        # In this process (a child process would import TensorFlow for one line).
        bad = cli_error(*TINY, f"--output_dir={out}", "--mode=generate", f"--prompt={prompt}")
        assert message in bad

    # Eval alone reuses the saved model and tokenizer, and appends to the log.
    again = _run(*TINY, f"--dataset=text:{glob}", f"--output_dir={out}", "--mode=eval")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text())["baseline"] == results["baseline"]
    assert len((out / "config_log.jsonl").read_text().splitlines()) == 4

    # At a terminal, the sweep and the calibration show Keras's progress bar.
    code, output = run_cli_on_terminal(
        *TINY, f"--dataset=text:{glob}", f"--output_dir={out}", "--mode=eval"
    )
    assert code == 0, output[-3000:]
    assert b"8/8" in output and b"/exit sweep" in output and b"\r" in output
    code, output = run_cli_on_terminal(
        *TINY,
        f"--dataset=text:{glob}",
        f"--output_dir={out}",
        "--mode=calibrate",
        "--calibration_prompts=2",
        "--prompt_length=4",
        "--max_new_tokens=4",
        "--calibration_thresholds=1.0,0.5,0.0",
    )
    assert code == 0, output[-3000:]
    assert b"4/4" in output and b"/calibration" in output

    # The HTML report, from the model, then again from its JSON alone.
    report = _run(
        *TINY,
        f"--dataset=text:{glob}",
        f"--output_dir={out}",
        "--mode=report",
        "--report_prompts=2",
        "--prompt_length=4",
        "--max_new_tokens=4",
        "--report_kl_strengths=1,4",
        "--report_timing_rounds=1",
        "--verbosity=-2",  # errors only: no progress lines
    )
    assert report.returncode == 0, report.stderr[-3000:]
    assert "[report]" not in report.stdout
    record = json.loads((out / "report.json").read_text())
    assert len(record["settings"]) == 1 + 3 * 2 and len(record["prompts"]) == 2
    page = (out / "report.html").read_text()
    assert page.count('class="tok"') == sum(len(run["tokens"]) for run in record["runs"]) > 0
    assert "full depth" in report.stdout and "strength 4" in report.stdout
    redrawn = _run(
        f"--output_dir={tmp_path / 'redrawn'}",
        "--mode=report",
        f"--report_from={out / 'report.json'}",
    )
    assert redrawn.returncode == 0, redrawn.stderr[-3000:]
    assert (tmp_path / "redrawn" / "report.html").read_text() == page


def _check_sweep_events(log_dir, results):
    """The sweep's scalars and exit-layer histograms are in TensorBoard's event files."""
    import tensorflow as tf  # noqa: PLC0415

    for criterion in {row["criterion"] for row in results["sweeps"]}:
        scalars, histograms = {}, set()
        for name in os.listdir(log_dir / "sweep" / criterion):
            for event in tf.compat.v1.train.summary_iterator(
                str(log_dir / "sweep" / criterion / name)
            ):
                for value in event.summary.value:
                    plugin = value.metadata.plugin_data.plugin_name
                    if plugin == "histograms":
                        histograms.add(event.step)
                    elif value.tag.startswith("sweep/"):
                        scalars[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
        rows = [row for row in results["sweeps"] if row["criterion"] == criterion]
        assert histograms == {threshold_step(row["threshold"]) for row in rows}
        for row in rows:
            step = threshold_step(row["threshold"])
            for name in ("perplexity", "savings", "avg_exit_layer"):
                assert scalars[(f"sweep/{name}", step)] == pytest.approx(row[name], rel=1e-6)
    assert os.listdir(log_dir / "sweep_hparams")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode=fly"], "--mode"),
        (["--thresholds=0.5,1.5"], "--thresholds must be numbers in [0, 1]"),
        (["--criteria=margin,vibes"], "--criteria must be a subset"),
        (["--strategy=tpu"], "--strategy"),
        (["--exit_layers=0,2"], "exit layer 0 is out of range"),
        (["--exit_layers=1,9"], "exit layer 9 is out of range"),
        (["--decode_threshold=1.5"], "--decode_threshold"),
        (["--decode_mode=teleport"], "--decode_mode"),
        (["--mode=generate"], "needs --prompt"),
        (["--benchmark_modes=lazy,warp"], "--benchmark_modes must be a subset"),
        (["--benchmark_batches=1,0"], "--benchmark_batches must be positive integers"),
        (["--benchmark_thresholds=2"], "--benchmark_thresholds must be numbers in [0, 1]"),
        (["--benchmark_speculative=1-4"], "--benchmark_speculative must be draft_layer:"),
        (["--target_agreement=0"], "--target_agreement must be in (0, 1]"),
        (["--calibration_delta=1"], "--calibration_delta must be in (0, 1)"),
        (["--calibration_method=bayes"], "--calibration_method"),
        (["--calibration_thresholds=0.5,-1"], "--calibration_thresholds must be numbers"),
        (["--mode=calibrate", "--decode_mode=speculative"], "needs an exiting --decode_mode"),
        (["--mode=benchmark"], "no model at"),
        (["--mode=calibrate"], "no model at"),
        (["--mode=train_gates"], "no model at"),
        (["--decision_layers=0,a"], "--decision_layers must be positive integers"),
        (["--decode_criterion=vibes"], "--decode_criterion"),
        (["--patience=0"], "--patience"),
        (["--threshold_decay=-1"], "--threshold_decay"),
        (["--report_modes=lazy,warp"], "--report_modes must be a subset"),
        (["--report_kl_strengths=1,0"], "--report_kl_strengths must be positive"),
        (["--report_kl_base=1"], "--report_kl_base must be in (0, 1)"),
        (["--report_thresholds=2"], "--report_thresholds must be numbers in [0, 1]"),
        (["--mode=report"], "no model at"),
        (["--mode=report", "--report_from=nowhere.json"], "do not exist"),
    ],
)
def test_bad_flags_fail_with_a_clear_message(tmp_path, args, message):
    # In this process: each check stops before TensorFlow works (a child process would
    # spend seconds importing it); an unexpected exception would fail the test.
    glob = write_corpus(tmp_path / "corpus", docs=4)
    error = cli_error(*TINY, f"--dataset=text:{glob}", f"--output_dir={tmp_path / 'out'}", *args)
    assert message in error


def test_bad_data_fails_with_a_clear_message(tmp_path):
    # In this process: the data is refused before any TensorFlow work.
    out = f"--output_dir={tmp_path / 'out'}"
    assert "matched no files" in cli_error(*TINY, f"--dataset=text:{tmp_path}/nothing/*.txt", out)
    blank = tmp_path / "blank"  # a path without the word: the message must say it
    blank.mkdir()
    (blank / "a.txt").write_text("   \n")
    assert "empty" not in str(blank)
    assert "gave an empty corpus" in cli_error(*TINY, f"--dataset=text:{blank}/*.txt", out)
    assert "parquet:x" in cli_error(*TINY, "--dataset=parquet:x", out)


def test_missing_or_corrupt_model_and_checkpoint(tmp_path):
    glob = write_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    # In this process: both are refused before any TensorFlow work.
    error = cli_error(*TINY, f"--dataset=text:{glob}", f"--output_dir={out}", "--mode=eval")
    assert "no model at" in error

    out.mkdir(exist_ok=True)
    (out / "model.keras").write_bytes(b"not a zip file")
    error = cli_error(*TINY, f"--dataset=text:{glob}", f"--output_dir={out}", "--mode=eval")
    assert "corrupt" in error

    result = _run(
        *TINY, f"--dataset=text:{glob}", f"--output_dir={out}", "--mode=train", "--train_steps=3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = out / "checkpoints" / "ckpt-00000003"
    with open(checkpoint / "optimizer.npz", "r+b") as f:
        f.write(b"garbage!")
    result = _run(*TINY, f"--dataset=text:{glob}", f"--output_dir={out}", "--mode=train")
    assert result.returncode != 0
    assert "optimizer.npz" in result.stderr and "corrupt" in result.stderr
    assert checkpoint.exists(), "a corrupt checkpoint is reported, never deleted"


def _run(*args, timeout=600):
    return run_cli(*args, timeout=timeout)
