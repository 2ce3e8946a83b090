"""Decode speed of the hierarchical Llama (FFN skip routers, exits) against full depth
and against Hugging Face `transformers`, measured side by side in one run.

    python benchmarks/llama_speed.py --out=benchmarks/results/llama_speed_cpu_tinyllama.json

Speed does not depend on the weights' values, so the TinyLlama-1.1B config is built with
random weights (about 4.4 GB in fp32). Router thresholds are calibrated on the prompt and
its full-depth continuation so that each capacity's share of FFNs runs; the random exit
gates get the threshold whose teacher-forced average exit layer there is `--exit_depth`.
The realized routed share and average exit layer of each run are measured and reported
(routing and exits change the continuation, so they drift from the targets). Every row's
full-depth figure is timed alternately with it. `--hf` then times our full depth and
`LlamaForCausalLM.generate` (greedy, KV cache, torch on CPU) on the same config in
`--hf_rounds` alternating rounds, HF in a child process (`hf_reference.py`) so that the
libraries' thread pools never share the machine; the JSON keeps every round. With
`--model_path` a trained `.keras` model is timed instead (its own routers and gates).
`--core_parallel` (TensorFlow on CPU) decodes with one thread per op, the inter-op
threads running independent ops side by side and every large product split in row blocks
(`toex_tf.inference.tf_threads`); the JSON records the threading used.
"""

import argparse
import json
import os
import time

import keras
import numpy as np

from toex_tf.analysis.llama_speed import RoutedCost, measure_llama_speed
from toex_tf.analysis.speed import compile_generate, device_name, time_run
from toex_tf.inference import DecoderAdapter, ExitPolicy
from toex_tf.inference.tf_threads import use_core_parallel_decoding
from toex_tf.loaders import hf_config_from_llama
from toex_tf.models import build_llama


def _randomize_gates(model, seed):
    # Untrained gates say 0.5 everywhere; random probes give per-token confidences.
    rng = np.random.default_rng(seed)
    for gate in model.gates:
        scale = 1.0 / np.sqrt(gate.kernel.shape[0])
        gate.kernel.assign(rng.normal(0, scale, gate.kernel.shape).astype("float32"))


def compare_with_transformers(model, prompt, new_tokens, repeats, rounds, jit_compile=False):
    """Full-depth decode against HF `transformers` on the same config, alternately.

    Each round times our full-depth `generate` (this process) and then HF's
    (`hf_reference.py` in a child process, so the two libraries' thread pools never share
    the machine), both for 1 and for `new_tokens` new tokens (medians of `repeats`).
    Returns the rounds and the median and range of the per-round ratios.
    """
    from hf_reference import generate_timing, time_transformers_isolated  # noqa: PLC0415

    length = prompt.shape[1] + new_tokens
    adapter = DecoderAdapter(model, length, routing="all")
    runs = [
        compile_generate(adapter, count, ExitPolicy("full"), jit_compile)
        for count in (1, new_tokens)
    ]
    hf_config = hf_config_from_llama(model.config)
    rounds_out = []
    for index in range(rounds):
        one, many = (time_run(lambda p, r=r: np.asarray(r(p)[0]), prompt, repeats)[0] for r in runs)
        ours = generate_timing(one, many, prompt.shape[0], new_tokens)
        hf = time_transformers_isolated(hf_config, prompt, new_tokens, repeats)
        row = {
            "ours": ours,
            "transformers": hf,
            "tokens_per_s_ratio": ours["tokens_per_s"] / hf["tokens_per_s"],
            "decode_step_ratio": hf["decode_step_ms"] / ours["decode_step_ms"],
        }
        rounds_out.append(row)
        print(
            f"round {index + 1}: ours {ours['tokens_per_s']:.2f} tok/s "
            f"({ours['decode_step_ms']:.1f} ms/step), transformers {hf['tokens_per_s']:.2f} "
            f"tok/s ({hf['decode_step_ms']:.1f} ms/step): x{row['tokens_per_s_ratio']:.3f}",
            flush=True,
        )

    def summary(key):
        values = [r[key] for r in rounds_out]
        return {"median": float(np.median(values)), "min": min(values), "max": max(values)}

    return {
        "version": rounds_out[0]["transformers"]["version"],
        "isolation": "transformers timed in a child process, alternating with ours",
        "rounds": rounds_out,
        "tokens_per_s": float(np.median([r["transformers"]["tokens_per_s"] for r in rounds_out])),
        "ours_full_depth_tokens_per_s": float(
            np.median([r["ours"]["tokens_per_s"] for r in rounds_out])
        ),
        "ours_over_transformers": summary("tokens_per_s_ratio"),
        "decode_step_speedup_over_transformers": summary("decode_step_ratio"),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tinyllama")
    parser.add_argument("--model_path", default=None, help="a trained .keras HierarchicalLlama")
    parser.add_argument("--capacities", default="0.9,0.7,0.55,0.4")
    parser.add_argument("--exit_depth", type=float, default=12.0, help="<= 0: no exit rows")
    parser.add_argument("--exit_mode", default="frozen", choices=["frozen", "lazy"])
    parser.add_argument("--prompt_length", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hf", action="store_true", help="also time HF transformers (torch)")
    parser.add_argument(
        "--hf_rounds",
        type=int,
        default=3,
        help="alternating rounds of our full depth and transformers (in a child process)",
    )
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument(
        "--match_on_decode",
        action="store_true",
        help="bisect router and gate thresholds on eager decodes of the prompt until the "
        "decode's routed share and exit depth are near the targets",
    )
    parser.add_argument(
        "--core_parallel",
        action="store_true",
        help="TensorFlow CPU: one thread per op, row-split products (tf_threads)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="llama_speed.json")
    args = parser.parse_args()
    if args.hf_rounds < 1:
        parser.error(f"--hf_rounds must be >= 1; got {args.hf_rounds}.")
    threading = "default"
    if args.core_parallel:
        threading = f"core_parallel x{use_core_parallel_decoding()}"

    start = time.perf_counter()
    if args.model_path:
        import toex_tf.models  # noqa: F401 - registers the classes

        model = keras.saving.load_model(args.model_path)
    else:
        keras.utils.set_random_seed(args.seed)
        model = build_llama(args.preset, max_length=args.prompt_length + args.new_tokens)
        _randomize_gates(model, args.seed)
    config = model.config
    print(f"model ready in {time.perf_counter() - start:.0f} s", flush=True)
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(0, config.vocab_size, (args.batch, args.prompt_length)).astype("int32")
    rows = measure_llama_speed(
        model,
        prompt,
        None,  # calibrate on the prompt and its full-depth continuation
        args.new_tokens,
        capacities=[float(c) for c in args.capacities.split(",")],
        exit_depth=args.exit_depth if args.exit_depth > 0 else None,
        mode=args.exit_mode,
        repeats=args.repeats,
        log=lambda line: print(line, flush=True),
        jit_compile=args.jit_compile,
        match_on_decode=args.match_on_decode,
    )
    result = {
        "model": {**config.to_dict(), "parameters": model.count_params()},
        "weights": "random" if not args.model_path else args.model_path,
        "dtype": "float32",
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
        "batch": args.batch,
        "repeats": args.repeats,
        "exit_depth": args.exit_depth,
        "match_on_decode": args.match_on_decode,
        "ffn_share_of_layer": RoutedCost.for_model(model, args.prompt_length).ffn_share(),
        "device": device_name(),
        "threading": threading,
        "rows": rows,
    }
    if args.hf:
        result["transformers"] = compare_with_transformers(
            model, prompt, args.new_tokens, args.repeats, args.hf_rounds, args.jit_compile
        )
        ratio = result["transformers"]["ours_over_transformers"]
        print(
            f"ours/transformers tok/s: x{ratio['median']:.3f} "
            f"(rounds {ratio['min']:.3f}-{ratio['max']:.3f})"
        )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    _plot(rows, os.path.splitext(args.out)[0] + ".png")
    print(f"Wrote {args.out}")


def _plot(rows, path):
    from matplotlib.figure import Figure  # noqa: PLC0415 - no pyplot, no backend switch

    figure = Figure(figsize=(6, 4), layout="tight")
    axis = figure.subplots()
    for exits, marker in ((False, "o"), (True, "s")):
        chosen = [r for r in rows[1:] if r["exits"] == exits]  # rows[0]: full depth
        if not chosen:
            continue
        capacities = [r["capacity"] for r in chosen]
        label = "routers + exits" if exits else "routers"
        axis.plot(
            capacities,
            [r["measured_speedup"] for r in chosen],
            marker,
            ls="-",
            label=f"{label}: measured",
        )
        axis.plot(
            capacities,
            [r["counted_speedup"] for r in chosen],
            marker,
            ls="--",
            alpha=0.6,
            label=f"{label}: counted",
        )
    axis.axhline(1.0, color="gray", lw=0.8)
    axis.set_xlabel("router capacity (share of FFNs run)")
    axis.set_ylabel("decode speedup over full depth")
    axis.legend(fontsize=8)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
