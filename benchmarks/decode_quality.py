"""Teacher-forced quality of each decode mode against full depth, on held-out windows.

One row per (mode, threshold): perplexity and accuracy when every window runs through
the real decode loop of that mode (its own caches: `frozen`'s projected K/V reach later
tokens), feeding the true token at each position; the relative perplexity increase and
accuracy change against full depth, measured in the same run; and the layers run per
token. `unfrozen` is the reference the exit sweep in `results.json` measures; `lazy`
must equal it; `frozen` shows what CALM state propagation costs.

    python benchmarks/decode_quality.py --model_dir=runs/quickstart \
        --out=benchmarks/results/decode_quality_cpu.json

The held-out windows are the training pipeline's (`toex_tf.data.prepared.prepare_data`): the run's
corpus split with its validation fraction and seed (from `config_log.jsonl`; the
built-in corpus, 0.1 and 0 without it), encoded with the run's tokenizer and cut by
`lm_windows`; the first `--windows` are used. Without `--model_dir` it scores a random
`--preset` model on random windows, which only checks that the modes run.

Batch size matters for `frozen` and `lazy`: a step skips layers only once every row of
its batch has exited. The default `--batch_size=1` decodes each window alone: the most
skipping and, for `frozen`, the largest quality cost.
"""

import argparse
import json
import os

import keras
import numpy as np

from toex_tf.analysis.quality import compare_modes
from toex_tf.inference import DecoderAdapter, ExitPolicy
from toex_tf.models import build_gpt


def _run_flags(model_dir: str) -> dict:
    """The flags of the run's last `config_log.jsonl` entry; {} without one."""
    path = os.path.join(model_dir, "config_log.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    return json.loads(lines[-1]).get("flags", {}) if lines else {}


def _held_out_windows(model_dir: str, windows: int, length: int):
    from toex_tf.data import (
        encode_documents,
        lm_windows,
        load_documents,
        load_tokenizer,
        split_documents,
    )

    flags = _run_flags(model_dir)
    dataset = flags.get("dataset", "builtin")
    fraction = flags.get("validation_fraction", 0.1)
    seed = flags.get("seed", 0)
    documents = load_documents(dataset, data_dir=flags.get("data_dir"))
    _, held_out = split_documents(documents, fraction, seed=seed)
    tokenizer = load_tokenizer(os.path.join(model_dir, "tokenizer"))
    inputs, targets = lm_windows(encode_documents(held_out, tokenizer), length)
    source = f"held-out {dataset} (validation_fraction={fraction}, seed={seed})"
    return inputs[:windows], targets[:windows], source


def _random_windows(windows: int, length: int, vocab: int):
    stream = np.random.default_rng(0).integers(0, vocab, (windows, length + 1)).astype("int32")
    return stream[:, :-1], stream[:, 1:], "random tokens"


def format_table(result: dict) -> str:
    full = result["full"]
    lines = [
        f"full depth: perplexity {full['perplexity']:.3f}, accuracy {full['accuracy']:.4f}, "
        f"{full['tokens']} tokens",
        f"{'mode':<10}{'criterion':<10}{'thresh':>7}{'ppl':>9}{'ppl_rel':>9}{'acc':>8}"
        f"{'acc_delta':>10}{'layers':>8}{'exit_layer':>11}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['mode']:<10}{row['criterion']:<10}{row['threshold']:>7.3f}"
            f"{row['perplexity']:>9.3f}{row['perplexity_increase']:>+9.2%}"
            f"{row['accuracy']:>8.4f}{row['accuracy_delta']:>+10.4f}"
            f"{row['avg_layers']:>8.2f}{row['avg_exit_layer']:>11.2f}"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", default=None, help="run dir with model.keras, tokenizer/")
    parser.add_argument("--preset", default="quickstart", help="random model without model_dir")
    parser.add_argument("--modes", default="unfrozen,frozen,lazy")
    parser.add_argument("--criterion", default="max_prob")
    parser.add_argument("--thresholds", default="0.1,0.2,0.3")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--window_length", type=int, default=128)
    parser.add_argument("--prefix_length", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--max_pending", type=int, default=8)
    parser.add_argument("--decision_layers", default="", help="e.g. 2,4; default: every exit")
    parser.add_argument("--out", default="decode_quality.json")
    args = parser.parse_args()
    if args.windows < 1 or args.window_length < 2:
        raise ValueError(
            f"need --windows >= 1 and --window_length >= 2; got {args.windows} and "
            f"{args.window_length}."
        )

    if args.model_dir:
        import toex_tf.models  # noqa: F401 - registers the classes

        model = keras.saving.load_model(os.path.join(args.model_dir, "model.keras"))
    else:
        model = build_gpt(args.preset)
    config = model.config
    if args.window_length > config.max_length:
        raise ValueError(
            f"--window_length={args.window_length} exceeds the model's "
            f"max_length={config.max_length}."
        )
    if args.model_dir and os.path.exists(
        os.path.join(args.model_dir, "tokenizer", "tokenizer.json")
    ):
        inputs, targets, source = _held_out_windows(
            args.model_dir, args.windows, args.window_length
        )
    else:
        inputs, targets, source = _random_windows(
            args.windows, args.window_length, config.vocab_size
        )
    decisions = None
    if args.decision_layers:
        decisions = tuple(int(x) for x in args.decision_layers.split(","))
    policies = [
        ExitPolicy(
            mode,
            args.criterion,
            float(threshold),
            max_pending=args.max_pending,
            decision_layers=decisions,
        )
        for mode in args.modes.split(",")
        for threshold in args.thresholds.split(",")
    ]
    adapter = DecoderAdapter(model)
    print(f"{len(inputs)} windows of {args.window_length} tokens: {source}.", flush=True)
    result = compare_modes(
        adapter,
        policies,
        inputs,
        targets,
        batch_size=args.batch_size,
        prefix_length=args.prefix_length,
    )
    print(format_table(result))
    output = {
        "model": {**config.to_dict(), "parameters": model.count_params()},
        "model_dir": args.model_dir,
        "windows": int(len(inputs)),
        "window_length": args.window_length,
        "source": source,
        "prefix_length": args.prefix_length,
        "batch_size": args.batch_size,
        "max_pending": args.max_pending,
        "decision_layers": list(adapter.decision_layers(ExitPolicy(decision_layers=decisions))),
        "backend": keras.backend.backend(),
        **result,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(output, f, indent=2)
    print(f"Wrote {args.out}.")


if __name__ == "__main__":
    main()
