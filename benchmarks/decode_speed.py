"""Decode speed of the early-exit modes against full depth, measured side by side.

One row per (mode, criterion, threshold, batch size): tokens/s, the full-depth tokens/s
measured in the same run, measured speedup, ideal speedup (counted compute: full depth
over what the mode ran, overhead of exit checks and frozen K/V projections included, a
lazy catch-up window counted as one pass per layer), realized/ideal and average layers.

    python benchmarks/decode_speed.py --model_dir=runs/quickstart \
        --out=benchmarks/results/decode_speed_cpu.json

Runs on TensorFlow (the loop in one `tf.function`) and on JAX (`KERAS_BACKEND=jax`, the
loop under `jax.jit`). Without `--model_dir` it times a random `--preset` model, whose
exit decisions mean nothing; thresholds 0.0 (every token leaves at the first exit) and
1.0 (none leaves: pure overhead) still bound what the modes can gain.
"""

import argparse
import json
import os

import keras
import numpy as np

from toex_tf.analysis.speed import format_speed_table, measure_decode_speed, plot_decode_speed
from toex_tf.inference import DecoderAdapter, ExitPolicy
from toex_tf.models import build_gpt


def _prompts(model_dir, batch, length, vocab):
    if model_dir and os.path.exists(os.path.join(model_dir, "tokenizer", "tokenizer.json")):
        from toex_tf.data import (
            builtin_corpus,
            encode_documents,
            load_tokenizer,
            split_documents,
        )

        tokenizer = load_tokenizer(os.path.join(model_dir, "tokenizer"))
        _, held_out = split_documents(builtin_corpus(), 0.1, seed=0)
        stream = encode_documents(held_out, tokenizer)
        starts = np.linspace(0, len(stream) - length - 1, batch).astype(int)
        return np.stack([stream[s : s + length] for s in starts]).astype("int32")
    return np.random.default_rng(0).integers(0, vocab, (batch, length)).astype("int32")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model_dir", default=None)
    parser.add_argument("--preset", default="quickstart", help="random model without model_dir")
    parser.add_argument("--modes", default="unfrozen,frozen,lazy")
    parser.add_argument("--criterion", default="max_prob")
    parser.add_argument("--thresholds", default="0.1,0.2,0.3")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt_length", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--max_pending", type=int, default=8)
    parser.add_argument("--decision_layers", default="", help="e.g. 2,4; default: every exit")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--speculative", default="", help="draft_layer:draft_length pairs, e.g. 2:4,3:4"
    )
    parser.add_argument(
        "--jit_compile", action="store_true", help="TensorFlow: compile with XLA as well"
    )
    parser.add_argument("--out", default="decode_speed.json")
    args = parser.parse_args()

    if args.model_dir:
        import toex_tf.models  # noqa: F401 - registers the classes

        model = keras.saving.load_model(os.path.join(args.model_dir, "model.keras"))
    else:
        model = build_gpt(args.preset)
    config = model.config
    decisions = None
    if args.decision_layers:
        decisions = tuple(int(x) for x in args.decision_layers.split(","))
    policies = [
        ExitPolicy(
            mode, args.criterion, float(t), max_pending=args.max_pending, decision_layers=decisions
        )
        for mode in args.modes.split(",")
        for t in args.thresholds.split(",")
    ]
    speculative = [
        tuple(int(x) for x in pair.split(":")) for pair in filter(None, args.speculative.split(","))
    ]
    prompts = {
        batch: _prompts(args.model_dir, batch, args.prompt_length, config.vocab_size)
        for batch in (int(b) for b in args.batches.split(","))
    }
    rows = measure_decode_speed(
        model,
        prompts,
        policies,
        args.new_tokens,
        repeats=args.repeats,
        speculative=speculative,
        log=lambda line: print(line, flush=True),
        jit_compile=args.jit_compile,
    )
    exit_layers = DecoderAdapter(model).decision_layers(ExitPolicy(decision_layers=decisions))
    result = {
        "model": {**config.to_dict(), "parameters": model.count_params()},
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "decision_layers": list(exit_layers),
        "jit_compile": args.jit_compile,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    plot = plot_decode_speed(rows, os.path.splitext(args.out)[0] + ".png")
    print(format_speed_table(rows))
    print(f"Wrote {args.out} and {plot}.")


if __name__ == "__main__":
    main()
