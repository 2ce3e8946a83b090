"""Every mode for every family: a tiny Llama checkpoint through generate, benchmark,
calibrate and export, and `--init_from` meaning the same for the GPT (train from it)."""

import json
import os

import keras
import numpy as np
import pytest
from cli_runner import cli_error, run_cli  # noqa: E402

from toex_tf.data import ByteTokenizer
from toex_tf.loaders import export_llama
from toex_tf.models import build_llama


def _corpus(directory):
    os.makedirs(directory, exist_ok=True)
    words = "the cat sat on a mat while the dog ran after a ball in the garden".split()
    for i in range(12):
        text = " ".join(words[(i * 5 + j * 3) % len(words)] for j in range(80))
        (directory / f"doc{i}.txt").write_text(text + ".\n")
    return f"--dataset=text:{directory}/*.txt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Hugging Face Llama checkpoint (random weights) with a toex byte tokenizer."""
    directory = tmp_path_factory.mktemp("llama_hf")
    keras.utils.set_random_seed(0)
    tokenizer = ByteTokenizer()
    model = build_llama("llama-tiny", vocab_size=tokenizer.vocab_size, exit_layers=(), capacity=1.0)
    export_llama(model, str(directory))
    tokenizer.save(str(directory / "toex_tokenizer"))
    return directory


LLAMA = ["--model=llama", "--llama_exit_layers=1", "--seq_len=16", "--batch_size=4"]


def test_llama_checkpoint_generates_and_exports_through_the_cli(checkpoint, tmp_path):
    out = tmp_path / "out"
    common = [*LLAMA, f"--init_from={checkpoint}", f"--output_dir={out}"]
    generated = _run(
        *common,
        "--mode=generate",
        "--prompt=the cat",
        "--prompt=a dog ran",
        "--max_new_tokens=5",
        "--decode_mode=frozen",
        "--decode_criterion=max_prob",
        "--decode_threshold=0.0",
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    record = json.loads((out / "generate.json").read_text())
    assert len(record["results"]) == 2 and record["num_layers"] == 2
    for result in record["results"]:
        assert len(result["tokens"]) == 5  # random weights never emit the stop id here
        # Threshold 0: every token after the first (the prefill's) leaves at exit 1.
        assert [t["exit_layer"] for t in result["tokens"]][1:] == [1, 1, 1, 1]

    exported = _run(*common, "--mode=export", f"--export_dir={tmp_path / 'saved'}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    printed = json.loads(exported.stdout.strip().splitlines()[-1])
    assert {"generate", "score", "logits", "generate_text"} <= set(printed["signatures"])
    import tensorflow as tf  # noqa: PLC0415

    from toex_tf.export import generate_with_export  # noqa: PLC0415

    loaded = tf.saved_model.load(str(tmp_path / "saved"))
    prompt = list(b"the cat")
    tokens, exits = generate_with_export(loaded, [prompt], [len(prompt)], 5, 0.0, "frozen")
    first = record["results"][0]
    assert list(tokens[0]) == [t["id"] for t in first["tokens"]]
    assert list(exits[0]) == [t["exit_layer"] for t in first["tokens"]]


def test_llama_checkpoint_benchmark_and_calibrate_through_the_cli(checkpoint, tmp_path):
    data = _corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    common = [*LLAMA, data, f"--init_from={checkpoint}", f"--output_dir={out}"]
    benchmarked = _run(
        *common,
        "--mode=benchmark",
        "--prompt_length=8",
        "--benchmark_new_tokens=4",
        "--benchmark_batches=1",
        "--benchmark_thresholds=0.0",
        "--benchmark_modes=lazy",
        "--benchmark_repeats=1",
        "--decode_criterion=max_prob",
    )
    assert benchmarked.returncode == 0, benchmarked.stderr[-3000:]
    rows = json.loads((out / "benchmark.json").read_text())["rows"]
    assert [row["mode"] for row in rows] == ["full", "lazy"]
    assert rows[1]["avg_layers"] < 2.0 and rows[1]["ideal_speedup"] > 1.0
    calibrated = _run(
        *common,
        "--mode=calibrate",
        "--decode_mode=frozen",
        "--decode_criterion=max_prob",
        "--prompt_length=8",
        "--max_new_tokens=4",
        "--calibration_prompts=4",
        "--calibration_thresholds=1.0,0.5,0.0",
    )
    assert calibrated.returncode == 0, calibrated.stderr[-3000:]
    record = json.loads((out / "calibration.json").read_text())
    rows = record["calibration"]["rows"]
    assert [row["threshold"] for row in rows][:1] == [1.0] and rows[0]["agreement"] == 1.0
    assert record["settings"]["criterion"] == "max_prob"
    # train_gates on a Llama is its exits phase: gates trained, the model saved with them.
    gated = _run(*common, "--mode=train_gates", "--train_steps=2")
    assert gated.returncode == 0, gated.stderr[-3000:]
    assert "logs" in json.loads((out / "gates.json").read_text())
    import toex_tf  # noqa: PLC0415

    lm = toex_tf.load(str(out))
    assert lm.model.gates and lm.policy.criterion == "learned"


def test_gpt_trains_from_init_from(tmp_path):
    data = _corpus(tmp_path / "corpus")
    tiny = ["--preset=tiny", "--tokenizer=byte", "--seq_len=16", "--batch_size=4"]
    first, second = tmp_path / "first", tmp_path / "second"
    trained = _run(*tiny, data, "--mode=train", "--train_steps=3", f"--output_dir={first}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    again = _run(
        *tiny,
        data,
        "--mode=train",
        "--train_steps=3",
        "--hidden_dim=32",  # ignored: the model of --init_from keeps its own size
        f"--init_from={first}",
        f"--output_dir={second}",
    )
    assert again.returncode == 0, again.stderr[-3000:]
    import toex_tf.models  # noqa: F401, PLC0415

    before = keras.saving.load_model(str(first / "model.keras"))
    after = keras.saving.load_model(str(second / "model.keras"))
    assert after.config == before.config
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(before.get_weights(), after.get_weights(), strict=True)
    ]
    assert any(changed)  # trained further, from the first model's weights
    assert (second / "tokenizer" / "tokenizer.json").exists()


def test_init_from_nowhere_and_missing_model_are_clear(tmp_path):
    # In this process: both stop before TensorFlow works.
    missing = cli_error(*LLAMA, f"--output_dir={tmp_path}", "--mode=generate", "--prompt=a")
    assert "needs --init_from" in missing
    nowhere = cli_error(
        *LLAMA,
        f"--output_dir={tmp_path}",
        f"--init_from={tmp_path / 'nowhere'}",
        "--mode=generate",
        "--prompt=a",
    )
    assert "does not exist" in nowhere


def _run(*args, timeout=600):
    return run_cli(*args, timeout=timeout)
