"""`toex_tf.run` only dispatches: `--config` names, one-line errors, tf.function traces."""

import os

import pytest
import tensorflow as tf
from cli_runner import run_cli  # noqa: E402

from toex_tf.run import COMMANDS, CONFIG_DIR, error_message, expand_config


def test_an_error_raised_while_tracing_prints_its_own_message():
    @tf.function
    def traced(x):
        raise ValueError("prompt is empty: give at least one token.")

    with pytest.raises(ValueError) as raised:
        traced(tf.constant(1))
    assert "in user code:" in str(raised.value)  # what TensorFlow adds
    assert error_message(raised.value) == "prompt is empty: give at least one token."
    assert error_message(ValueError("plain")) == "plain"


def test_config_names_the_flagfiles_shipped_with_the_package():
    names = sorted(f[:-4] for f in os.listdir(CONFIG_DIR) if f.endswith(".cfg"))
    assert {"quickstart", "tiny", "llama_small"} <= set(names)
    expanded = expand_config(["run", "--config=tiny", "--mode=eval", "--config", "quickstart"])
    assert expanded == [
        "run",
        f"--flagfile={os.path.join(CONFIG_DIR, 'tiny.cfg')}",
        "--mode=eval",
        f"--flagfile={os.path.join(CONFIG_DIR, 'quickstart.cfg')}",
    ]
    with pytest.raises(SystemExit, match=r"--config=nope: no such config; one of \["):
        expand_config(["run", "--config=nope"])


def test_every_mode_has_one_command_module():
    from toex_tf.cli.flags import MODES  # noqa: PLC0415

    assert set(COMMANDS) == set(MODES)
    for module in set(COMMANDS.values()):
        assert os.path.isfile(os.path.join(os.path.dirname(CONFIG_DIR), "cli", f"{module}.py")), (
            module
        )


def test_config_works_from_any_directory_and_errors_are_one_line(tmp_path):
    # A flag only the run can check: one line naming it, no usage text, no traceback.
    result = _run("--config=tiny", f"--output_dir={tmp_path}", "--mode=generate", cwd=tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "toex_tf.run" in line]
    assert lines == ["toex_tf.run: error: --mode=generate needs --prompt."], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Modes (" not in result.stderr
    result = _run("--config=tiny", "--mode=train", cwd=tmp_path)  # no --output_dir
    assert "toex_tf.run: error: --output_dir is required." in result.stderr
    result = _run("--config=tiny", f"--output_dir={tmp_path}", "--phase=base")
    assert "--phase is for --model=llama" in result.stderr
    result = _run(f"--output_dir={tmp_path}", "--model=gpt", "--target_speedup=1.5")
    assert "--target_speedup searches a Llama's router capacity" in result.stderr


def _run(*args, cwd=None):
    return run_cli(*args, timeout=300, cwd=cwd)
