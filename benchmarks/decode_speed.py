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
import platform
import time

import keras
import numpy as np

from toex_tf.analysis.flops import CostModel
from toex_tf.inference import DecoderAdapter, ExitPolicy, generate, generate_speculative
from toex_tf.models import build_gpt


def _device() -> str:
    if keras.backend.backend() == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    return f"{platform.machine()} CPU x{os.cpu_count()}"


def _compile(adapter, new_tokens, policy):
    if keras.backend.backend() == "jax":
        import jax

        run = jax.jit(lambda p: generate(adapter, p, new_tokens, policy, return_state=True))
        return lambda prompt: jax.block_until_ready(run(prompt))
    import tensorflow as tf

    run = tf.function(lambda p: generate(adapter, p, new_tokens, policy, return_state=True))
    return lambda prompt: keras.tree.map_structure(np.asarray, run(prompt))


def _compile_speculative(adapter, new_tokens, draft_layer, draft_length):
    def run_fn(p):
        return generate_speculative(
            adapter, p, new_tokens, draft_layer, draft_length, return_state=True
        )

    if keras.backend.backend() == "jax":
        import jax

        run = jax.jit(run_fn)
        return lambda prompt: jax.block_until_ready(run(prompt))
    import tensorflow as tf

    run = tf.function(run_fn)
    return lambda prompt: keras.tree.map_structure(np.asarray, run(prompt))


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


def _time(run, prompt, repeats):
    run(prompt)  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = run(prompt)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def _row(tps, full_tps, ideal, avg_layers, batch, **setting) -> dict:
    """One JSON row: the setting, then the measured and counted figures."""
    return {
        **setting,
        "batch": batch,
        "tokens_per_s": tps,
        "full_tokens_per_s": full_tps,
        "measured_speedup": tps / full_tps,
        "ideal_speedup": ideal,
        "realized_over_ideal": (tps / full_tps) / ideal,
        "avg_layers": avg_layers,
        "backend": keras.backend.backend(),
        "device": _device(),
    }


def _mode_cost(cost, exit_layers, policy, avg_layers, kv_fraction):
    num_layers = cost.num_layers
    checked = [e for e in exit_layers if e < num_layers]
    if policy.mode == "full":
        checks = 0.0
    elif policy.mode == "unfrozen":
        checks = float(len(checked))
    else:
        checks = float(sum(e <= avg_layers for e in checked))
    skipped = num_layers - avg_layers
    kv = skipped * kv_fraction * cost.layer_macs if policy.mode == "frozen" else 0.0
    return avg_layers * cost.layer_macs + checks * cost.check_macs + cost.full_head_macs + kv


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
    parser.add_argument("--out", default="decode_speed.json")
    args = parser.parse_args()

    if args.model_dir:
        import toex_tf.models  # noqa: F401 - registers the classes

        model = keras.saving.load_model(os.path.join(args.model_dir, "model.keras"))
    else:
        model = build_gpt(args.preset)
    adapter = DecoderAdapter.from_gpt(model)
    config = model.gpt_config
    context = args.prompt_length + args.new_tokens / 2
    cost = CostModel.for_gpt(model, context_length=context)
    d = config.hidden_dim
    kv_fraction = (2 * d * d) / cost.layer_macs  # K and V projections of one layer
    decisions = None
    if args.decision_layers:
        decisions = tuple(int(x) for x in args.decision_layers.split(","))
    exit_layers = adapter.decision_layers(ExitPolicy(decision_layers=decisions))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompt = _prompts(args.model_dir, batch, args.prompt_length, config.vocab_size)
        full_policy = ExitPolicy("full")
        full_time, _ = _time(_compile(adapter, args.new_tokens, full_policy), prompt, args.repeats)
        full_tps = batch * args.new_tokens / full_time
        settings = [(full_policy, None)] + [
            (
                ExitPolicy(
                    mode,
                    args.criterion,
                    float(t),
                    max_pending=args.max_pending,
                    decision_layers=decisions,
                ),
                t,
            )
            for mode in args.modes.split(",")
            for t in args.thresholds.split(",")
        ]
        for policy, threshold in settings:
            if policy.mode == "full":
                seconds, out = full_time, None
            else:
                seconds, out = _time(
                    _compile(adapter, args.new_tokens, policy), prompt, args.repeats
                )
            if out is None:
                avg_layers = float(config.num_layers)
            else:
                avg_layers = float(out[2]["layers_run"]) / float(out[2]["steps"])
            ideal = cost.full_depth_macs / _mode_cost(
                cost, exit_layers, policy, avg_layers, kv_fraction
            )
            tps = batch * args.new_tokens / seconds
            row = _row(
                tps,
                full_tps,
                ideal,
                avg_layers,
                batch,
                mode=policy.mode,
                criterion=None if policy.mode == "full" else policy.criterion,
                threshold=None if threshold is None else float(threshold),
            )
            rows.append(row)
            print(
                f"{row['mode']:<9}{str(row['threshold']):>6} b={batch} "
                f"{tps:8.1f} tok/s  x{row['measured_speedup']:.2f} (ideal x{ideal:.2f}, "
                f"layers {avg_layers:.2f})",
                flush=True,
            )
        for pair in filter(None, args.speculative.split(",")):
            draft_layer, draft_length = (int(x) for x in pair.split(":"))
            run = _compile_speculative(adapter, args.new_tokens, draft_layer, draft_length)
            seconds, out = _time(run, prompt, args.repeats)
            rounds = float(out[2]["rounds"])
            # Sequential layer passes: the draft runs k layers per drafted token, the
            # verification one windowed pass through the other L - k layers.
            passes = rounds * (draft_length * draft_layer + config.num_layers - draft_layer)
            avg_layers = passes / (args.new_tokens - 1)
            tps = batch * args.new_tokens / seconds
            ideal = config.num_layers / avg_layers
            rows.append(
                _row(
                    tps,
                    full_tps,
                    ideal,
                    avg_layers,
                    batch,
                    mode="speculative",
                    criterion=None,
                    threshold=None,
                    draft_layer=draft_layer,
                    draft_length=draft_length,
                    accepted_per_round=float(out[2]["accepted"]) / rounds,
                )
            )
            print(
                f"spec {draft_layer}:{draft_length} b={batch} {tps:8.1f} tok/s  "
                f"x{tps / full_tps:.2f} (ideal x{ideal:.2f}, layers {avg_layers:.2f}, "
                f"accepted/round {rows[-1]['accepted_per_round']:.2f})",
                flush=True,
            )
    result = {
        "model": {**config.to_dict(), "parameters": model.count_params()},
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "decision_layers": list(exit_layers),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"Wrote {args.out}.")


if __name__ == "__main__":
    main()
