"""The toex_tf command line: `python -m toex_tf.run --flagfile=configs/quickstart.cfg`.

`--config=NAME` reads the flagfile `NAME.cfg` shipped with the package (`quickstart`,
`tiny`, `llama_small`), from any directory. Flags after it win.

Modes (`--mode`), each for either family (`--model=gpt|llama`; `toex_tf/cli/<mode>.py`):
    train           train a model and save OUTPUT_DIR/model.keras (a Llama: one --phase)
    eval            held-out quality: the GPT exit sweep → results.json; the Llama
                    quality table with measured speed → llama_results.json
    train_and_eval  both
    generate        --prompt text (repeat for a batch) → continuations and each token's
                    exit layer, as JSON (also OUTPUT_DIR/generate.json)
    benchmark       decode speed of exit modes against full depth → benchmark.json/.png
                    (a Llama with --target_speedup: the router capacity search)
    calibrate       the cheapest --decode_mode threshold that keeps agreement with full
                    depth on held-out prompts (empirical or Learn-then-Test)
    train_gates     learned exit gates on the frozen model
    export          a SavedModel whose signatures run the early-exit decode loop in the
                    graph (--export_dir), with `generate_text` when the tokenizer allows
    report          an HTML page of which tokens exit where and why, across modes and
                    settings (default: KL strengths 0.5-4 × unfrozen, frozen, lazy)
                    → report.html and report.json

`--init_from` names the model a run starts from or reads, for every family and mode: a
run directory, a .keras file, a Hugging Face checkpoint directory or an hf://, kaggle://
or TF-Hub handle. Without it, modes read OUTPUT_DIR/model.keras.

This module only dispatches; `toex_tf/cli/flags.py` defines and checks every flag.
"""

import importlib
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # noqa: E402

from toex_tf.cli.flags import FLAGS, check_combinations  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
COMMANDS = {
    "train": "train",
    "train_and_eval": "train",
    "eval": "evaluate",
    "generate": "generate",
    "benchmark": "benchmark",
    "calibrate": "calibrate",
    "train_gates": "train_gates",
    "export": "export",
    "report": "report",
}


def error_message(error: Exception) -> str:
    """The error's own message, without the "in user code:" trace TensorFlow adds to an
    error raised while a `tf.function` is traced (its last line is the original)."""
    message = str(error)
    if "in user code:" in message:
        lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
        last = lines[-1]
        prefix = f"{type(error).__name__}: "
        message = last[len(prefix) :] if last.startswith(prefix) else last
    return message


def main(argv):
    if len(argv) > 1:
        sys.exit(f"toex_tf.run: error: unexpected arguments: {argv[1:]}")
    try:
        check_combinations()
        if FLAGS.core_parallel:  # before TensorFlow runs its first op
            from toex_tf.inference.tf_threads import use_core_parallel_decoding  # noqa: PLC0415

            try:
                use_core_parallel_decoding()
            except RuntimeError as error:
                raise ValueError(f"--core_parallel: {error}") from error
        command = importlib.import_module(f"toex_tf.cli.{COMMANDS[FLAGS.mode]}")
        command.run()
    except (ValueError, TypeError) as error:
        # Bad input (flags, data, checkpoints): one clear line instead of a traceback.
        sys.exit(f"toex_tf.run: error: {error_message(error)}")


def expand_config(argv: list) -> list:
    """Turns `--config=NAME` (or `--config NAME`) into `--flagfile=<package>/configs/NAME.cfg`."""
    expanded, index = [], 0
    while index < len(argv):
        arg = argv[index]
        name = None
        if arg.startswith("--config="):
            name = arg[len("--config=") :]
        elif arg == "--config" and index + 1 < len(argv):
            index += 1
            name = argv[index]
        if name is None:
            expanded.append(arg)
        else:
            path = os.path.join(CONFIG_DIR, f"{name}.cfg")
            if not os.path.isfile(path):
                names = sorted(f[:-4] for f in os.listdir(CONFIG_DIR) if f.endswith(".cfg"))
                sys.exit(f"toex_tf.run: error: --config={name}: no such config; one of {names}.")
            expanded.append(f"--flagfile={path}")
        index += 1
    return expanded


def run_main():
    app.run(main, argv=expand_config(sys.argv))


if __name__ == "__main__":
    run_main()
