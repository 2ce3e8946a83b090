"""`--model=seq2seq` through the command line and `toex_tf.load`: train, eval, generate."""

import json
import os

import numpy as np
from cli_runner import run_cli

import toex_tf

WORDS = ["cat", "dog", "sun", "map", "red", "box"]


def _tsv(path, count=48):
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(count):
        source = " ".join(rng.choice(WORDS, size=rng.integers(1, 3)))
        lines.append(f"{source}\t{source[::-1]}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_translation_trains_evaluates_and_generates(tmp_path):
    run_dir = tmp_path / "run"
    common = [
        "--model=seq2seq",
        f"--output_dir={run_dir}",
        "--seq2seq_preset=tiny",
        f"--dataset=tsv:{_tsv(tmp_path / 'pairs.tsv')}",
        "--tokenizer=byte",
        "--nodecode_jit_compile",
    ]
    result = run_cli(
        *common,
        "--mode=train_and_eval",
        "--train_steps=4",
        "--batch_size=8",
        "--checkpoint_every=2",
        "--eval_sentences=3",
        "--criteria=max_prob",
        "--thresholds=0.5",
        "--benchmark_modes=frozen",
        "--benchmark_speculative=1:2",
        "--decision_layers=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["baseline"]) >= {"bleu", "chrf", "num_layers"}
    assert results["baseline"]["num_layers"] == 2
    assert [row["mode"] for row in results["sweeps"]] == ["frozen", "speculative"]
    assert results["sweeps"][0]["decision_layers"] == [1]  # --decision_layers reached it
    for row in results["sweeps"]:
        assert set(row) >= {
            "mode",
            "criterion",
            "threshold",
            "bleu",
            "chrf",
            "avg_exit_layer",
            "ideal_speedup",
            "measured_speedup",
        }
    assert (run_dir / "results.png").exists() and "full depth" in result.stdout
    data = json.loads((run_dir / "data.json").read_text())
    assert data["pairs"]["train"] > data["pairs"]["test"] > 0
    # The Python API and the command line give the same translation.
    translator = toex_tf.load(str(run_dir))
    expected = translator.generate("cat dog", mode="frozen", threshold=0.5)
    generated = run_cli(
        *common,
        "--mode=generate",
        "--prompt=cat dog",
        "--decode_mode=frozen",
        "--decode_threshold=0.5",
        "--max_new_tokens=15",
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    output = json.loads(generated.stdout)["results"][0]
    assert output["prompt"] == "cat dog" and output["text"] == expected.text
    assert [t["exit_layer"] for t in output["tokens"]] == expected.exit_layers
    # --mode=export writes the translation signatures (their parity: tests/serving).
    exported = run_cli(*common, "--mode=export")
    assert exported.returncode == 0, exported.stderr[-3000:]
    signatures = json.loads(exported.stdout.strip().splitlines()[-1])["signatures"]
    assert signatures == ["translate", "serving_default", "translate_text"]
    assert (run_dir / "saved_model" / "saved_model.pb").exists()
    # --mode=calibrate: agreement with full depth on validation sources, BLEU per row.
    calibrated = run_cli(
        *common,
        "--mode=calibrate",
        "--decode_mode=frozen",
        "--calibration_thresholds=0.0,0.5",
        "--calibration_prompts=5",
        "--calibration_batch_size=2",
        "--target_agreement=0.5",
    )
    assert calibrated.returncode == 0, calibrated.stderr[-3000:]
    record = json.loads((run_dir / "calibration.json").read_text())
    rows = record["calibration"]["rows"]
    assert [row["threshold"] for row in rows] == [1.0, 0.5, 0.0]
    assert rows[0]["agreement"] == 1.0 and rows[0]["avg_layers"] == 2.0  # never exits
    assert rows[0]["bleu"] == record["full_depth"]["bleu"]  # 1.0 translates as full depth
    assert rows[-1]["avg_layers"] == 1.0  # threshold 0: every token leaves at layer 1
    assert record["settings"]["split"] == "validation"
    assert 0 < record["settings"]["num_sentences"] <= 5
    assert f"Chosen threshold: {record['calibration']['threshold']:g}" in calibrated.stdout
    assert os.listdir(run_dir / "tensorboard" / "calibration" / "frozen_max_prob")
    # --mode=report: test sources beside their references, tokens coloured by exit layer.
    reported = run_cli(
        *common,
        "--mode=report",
        "--report_prompts=2",
        "--report_modes=frozen",
        "--report_kl_strengths=1",
        "--report_timing_rounds=1",
        "--max_new_tokens=6",
    )
    assert reported.returncode == 0, reported.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["kind"] == "translation" and len(report["prompts"]) == 2
    assert all(prompt["reference"] for prompt in report["prompts"])
    page = (run_dir / "report.html").read_text()
    assert page.count("Reference: ") == 2 and "Source 1" in page
    assert page.count('class="tok"') == sum(len(run["tokens"]) for run in report["runs"])


def test_seq2seq_errors_are_one_line(tmp_path):
    result = run_cli(
        "--model=seq2seq", f"--output_dir={tmp_path}", "--mode=train", "--target_lang=xx"
    )
    assert result.returncode != 0
    assert "target_lang 'xx' is not a known language code" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("--model=seq2seq", f"--output_dir={tmp_path}", "--mode=train_gates")
    assert result.returncode != 0
    assert "does not support --mode=train_gates" in result.stderr
