"""Exits on a real pretrained model (SmolLM2-135M, frozen base), measured on held-out
text: table (a) of issue 17.

    python -m toex_tf.run --config=smollm2 --mode=train --phase=exit_heads --init_from=smollm2
    python benchmarks/real_model_exits.py --run_dir=runs/smollm2

For each exit mode (`frozen`, `lazy`) and threshold of the model's exit criterion, and
each self-speculative `draft_layer:draft_length`:

- quality, teacher-forced through the mode's own decode loop (`compare_modes`, batch 1)
  on `--windows` held-out windows of the built-in corpus: perplexity increase over full
  depth, top-1 agreement with full depth (the same loop scored against the full-depth
  argmax), average layers run per token;
- speed (`measure_decode_speed`): greedy decode tok/s of `--new_tokens` tokens, batch 1,
  timed alternately with full depth in this process, and the ideal (counted) speedup.

Speculative decoding is lossless: its quality is full depth's by construction (the
parity test pins that); its row reports the accepted drafts per round.

Writes benchmarks/results/real_model_exits.json and .png; each row carries `setting`,
`perplexity_increase`, `top1_agreement`, `avg_layers`, `measured_speedup`,
`ideal_speedup` and `lossless`.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run_dir", default="runs/smollm2")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=96)
    parser.add_argument("--modes", default="frozen,lazy")
    parser.add_argument("--criterion", default=None, help="default: the model's own")
    parser.add_argument("--thresholds", default="0.5,0.7,0.8,0.9,0.95")
    parser.add_argument("--speculative", default="", help="draft_layer:draft_length,...")
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--prompt_length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jit_compile", action="store_true", help="XLA for every run")
    parser.add_argument("--output", default=os.path.join(RESULTS, "real_model_exits.json"))
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import toex_tf  # noqa: PLC0415
    from toex_tf.analysis.quality import compare_modes  # noqa: PLC0415
    from toex_tf.analysis.speed import cpu_name, measure_decode_speed  # noqa: PLC0415
    from toex_tf.config import DataConfig  # noqa: PLC0415
    from toex_tf.data.prepared import prepare_data  # noqa: PLC0415
    from toex_tf.inference import ExitPolicy  # noqa: PLC0415

    lm = toex_tf.load(args.run_dir)
    model = lm.model
    criterion = args.criterion or lm.policy.criterion
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    modes = [m for m in args.modes.split(",") if m]
    speculative = [tuple(int(x) for x in p.split(":")) for p in args.speculative.split(",") if p]
    with tempfile.TemporaryDirectory() as folder:
        data = prepare_data(DataConfig(), args.seq_len, folder, tokenizer=lm.tokenizer)
    inputs = data.val_inputs[: args.windows].astype("int32")
    targets = data.val_targets[: args.windows].astype("int32")
    policies = [ExitPolicy(mode, criterion, t) for mode in modes for t in thresholds]

    start = time.perf_counter()
    scorer = lm.adapter_for(args.seq_len)  # a cache of the window's size, not 8k
    quality = compare_modes(scorer, policies, inputs, targets)
    full_top1 = np.asarray(model(inputs)["logits"]).argmax(-1).astype("int32")
    agreement = compare_modes(scorer, policies, inputs, full_top1)
    print(f"quality: {time.perf_counter() - start:.0f} s", flush=True)

    prompts = {1: inputs[:1, : args.prompt_length]}
    speed = measure_decode_speed(
        model,
        prompts,
        policies,
        args.new_tokens,
        repeats=args.repeats,
        speculative=speculative,
        jit_compile=args.jit_compile,
        log=lambda line: print(line, flush=True),
        max_length=lm.adapter_for(args.prompt_length + args.new_tokens + 8).max_length,
    )
    rows = []
    for index, policy in enumerate(policies):
        q, a = quality["rows"][index], agreement["rows"][index]
        s = next(
            r
            for r in speed
            if r["mode"] == policy.mode
            and r.get("criterion") == policy.criterion
            and r.get("threshold") == policy.threshold
        )
        rows.append(
            {
                "setting": f"{policy.mode} {policy.criterion} {policy.threshold}",
                "mode": policy.mode,
                "criterion": policy.criterion,
                "threshold": policy.threshold,
                "perplexity_increase": q["perplexity_increase"],
                "top1_agreement": a["accuracy"],
                "avg_layers": q["avg_layers"],
                "avg_exit_layer": q["avg_exit_layer"],
                "exit_distribution": q["exit_distribution"],
                "measured_speedup": s["measured_speedup"],
                "ideal_speedup": s["ideal_speedup"],
                "decode_avg_layers": s["avg_layers"],
                "tokens_per_s": s["tokens_per_s"],
                "full_tokens_per_s": s["full_tokens_per_s"],
                "lossless": False,
            }
        )
    for r in speed:
        if r["mode"] == "speculative":
            rows.append(
                {
                    "setting": f"speculative {r['draft_layer']}:{r['draft_length']}",
                    "mode": "speculative",
                    "draft_layer": r["draft_layer"],
                    "draft_length": r["draft_length"],
                    "accepted_per_round": r.get("accepted_per_round"),
                    "perplexity_increase": 0.0,
                    "top1_agreement": 1.0,
                    "avg_layers": r["avg_layers"],
                    "measured_speedup": r["measured_speedup"],
                    "ideal_speedup": r["ideal_speedup"],
                    "tokens_per_s": r["tokens_per_s"],
                    "full_tokens_per_s": r["full_tokens_per_s"],
                    "lossless": True,
                }
            )
    record = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "run_dir": args.run_dir,
        "model": {
            "num_layers": model.num_layers,
            "exit_layers": list(model.exit_layers),
            "exit_adapter": model.config.exit_adapter,
            "exit_adapter_units": model.config.exit_adapter_units,
        },
        "held_out": {"windows": int(len(inputs)), "seq_len": args.seq_len},
        "full_depth": quality["full"],
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)
    _plot(rows, args.output.replace(".json", ".png"))
    for row in rows:
        print(
            f"{row['setting']:<28} ppl {100 * row['perplexity_increase']:+7.1f}%  agree "
            f"{row['top1_agreement']:.3f}  layers {row['avg_layers']:5.1f}  measured "
            f"{row['measured_speedup']:.2f}x  ideal {row['ideal_speedup']:.2f}x"
        )


def _plot(rows, path: str) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(7, 4), layout="tight")
    axes = figure.add_subplot()
    for mode, marker in (("frozen", "o"), ("lazy", "s"), ("speculative", "^")):
        picked = [r for r in rows if r["mode"] == mode]
        if not picked:
            continue
        x = [100 * r["perplexity_increase"] for r in picked]
        axes.plot(x, [r["measured_speedup"] for r in picked], marker, label=f"{mode} measured")
        if mode != "speculative":
            axes.plot(
                x, [r["ideal_speedup"] for r in picked], marker, mfc="none", label=f"{mode} ideal"
            )
    axes.axhline(1.0, color="grey", lw=0.8)
    axes.set_xlabel("perplexity increase over full depth (%)")
    axes.set_ylabel("decode speedup (batch 1)")
    axes.set_title("SmolLM2-135M, exits on the frozen base")
    axes.legend(fontsize=8)
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
