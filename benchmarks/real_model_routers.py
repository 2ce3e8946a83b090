"""FFN skip routers on a real pretrained model (SmolLM2-135M, frozen base), measured on
held-out text: table (b) of issue 17, the seed's hierarchical table.

    python -m toex_tf.run --flagfile=configs/smollm2.cfg --mode=train --phase=exit_heads \
        --init_from=smollm2
    python benchmarks/real_model_routers.py --exits_from=runs/smollm2

1. The GGUF is loaded with a `SkipRouter` on every FFN (and the exits of
   `--exits_from`, whose adapters, norms and gates are copied in).
2. Each router's causal predictor is fitted to the relative FFN change of the frozen
   base (`toex_tf.training.router_predictors`) on `--fit_windows` training windows.
3. For each allocation (`layer`: every layer routes the capacity; `global`: one
   threshold, the capacity is the share of all (token, layer) pairs) and each capacity,
   without and with exits (learned gates at the threshold reaching `--exit_depth`
   average layers, teacher-forced):
   - quality, teacher-forced on `--windows` held-out windows under causal routing:
     perplexity increase over the base and top-1 agreement with the base;
   - speed (`measure_llama_speed`): greedy decode tok/s of `--new_tokens` tokens, batch
     1, timed alternately with full depth in this process (XLA with `--jit_compile`),
     and the counted speedup from the realized routed share and depth.

Writes benchmarks/results/real_model_routers.json and .png; each row carries `setting`,
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


def copy_exits(source, target) -> int:
    """Copies the exit norms, adapters and gates of `source` into `target` (same exit
    layers); returns the number of layers copied."""
    if tuple(source.exit_layers) != tuple(target.exit_layers):
        raise ValueError(
            f"exit layers differ: {source.exit_layers} in the source, {target.exit_layers} here."
        )
    copied = 0
    for mine, theirs in zip(target.blocks, source.blocks, strict=True):
        for name in ("exit_norm", "exit_adapter", "learned_gate"):
            layer, other = getattr(mine, name, None), getattr(theirs, name, None)
            if layer is not None and other is not None:
                layer.set_weights(other.get_weights())
                copied += 1
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2", help="GGUF file or handle")
    parser.add_argument("--exits_from", default="runs/smollm2")
    parser.add_argument("--fit_windows", type=int, default=64)
    parser.add_argument("--calibration_windows", type=int, default=16)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--capacities", default="0.9,0.7,0.55,0.4")
    parser.add_argument("--allocations", default="layer,global")
    parser.add_argument("--exit_depth", type=float, default=27.0, help="0: no exit rows")
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--prompt_length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jit_compile", action="store_true")
    parser.add_argument("--output", default=os.path.join(RESULTS, "real_model_routers.json"))
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import toex_tf  # noqa: PLC0415
    from toex_tf.analysis.llama_quality import perplexity  # noqa: PLC0415
    from toex_tf.analysis.llama_speed import measure_llama_speed  # noqa: PLC0415
    from toex_tf.analysis.speed import cpu_name  # noqa: PLC0415
    from toex_tf.calibration.routers import calibrate_routers  # noqa: PLC0415
    from toex_tf.config import DataConfig  # noqa: PLC0415
    from toex_tf.data.prepared import prepare_data  # noqa: PLC0415
    from toex_tf.loaders import load_llama  # noqa: PLC0415
    from toex_tf.training.router_predictors import fit_router_predictors  # noqa: PLC0415

    log = lambda line: print(line, flush=True)  # noqa: E731
    started = time.perf_counter()
    exits = toex_tf.load(args.exits_from).model
    config = exits.config
    model = load_llama(
        args.model,
        exit_layers=tuple(layer for layer in config.exit_layers if layer < config.num_layers),
        capacity=0.5,  # routers on every FFN; the thresholds set each row's share
        exit_adapter=config.exit_adapter,
        exit_adapter_units=config.exit_adapter_units,
    )
    log(f"copied {copy_exits(exits, model)} exit layers from {args.exits_from}")
    del exits
    with tempfile.TemporaryDirectory() as folder:
        data = prepare_data(DataConfig(), args.seq_len, folder, tokenizer=model.tokenizer)
    fit = data.train_inputs[: args.fit_windows].astype("int32")
    calibration = data.train_inputs[-args.calibration_windows :].astype("int32")
    inputs = data.val_inputs[: args.windows].astype("int32")
    targets = data.val_targets[: args.windows].astype("int32")

    fits = fit_router_predictors(model, fit, log=log)
    log(f"predictors fitted: {time.perf_counter() - started:.0f} s")
    for router in model.routers:
        router.predictor_threshold.assign(-1e30)  # every FFN runs: the base
    base = perplexity(model, inputs, targets)
    base_top1 = np.asarray(model(inputs)["logits"]).argmax(-1).astype("int32")

    capacities = [float(c) for c in args.capacities.split(",") if c]
    rows = []
    for allocation in [a for a in args.allocations.split(",") if a]:
        speed = measure_llama_speed(
            model,
            inputs[:1, : args.prompt_length],
            calibration,
            args.new_tokens,
            capacities=capacities,
            exit_depth=args.exit_depth or None,
            repeats=args.repeats,
            log=log,
            jit_compile=args.jit_compile,
            allocation=allocation,
        )
        for row in speed[1:]:
            calibrate_routers(model, calibration, row["capacity"], allocation=allocation)
            quality = perplexity(model, inputs, targets, row["gate_threshold"])
            agreement = perplexity(model, inputs, base_top1, row["gate_threshold"])
            exits_on = "with exits" if row["exits"] else "no exits"
            rows.append(
                {
                    **row,
                    "setting": f"{allocation} capacity {row['capacity']} {exits_on}",
                    "allocation": allocation,
                    "perplexity": quality["perplexity"],
                    "perplexity_increase": quality["perplexity"] / base["perplexity"] - 1.0,
                    "top1_agreement": agreement["accuracy"],
                    "teacher_forced_exit_layer": quality["avg_exit_layer"],
                    "ideal_speedup": row["counted_speedup"],
                    "lossless": False,
                }
            )
            log(
                f"{rows[-1]['setting']:<36} ppl {100 * rows[-1]['perplexity_increase']:+8.1f}% "
                f"agree {rows[-1]['top1_agreement']:.3f} measured "
                f"{row['measured_speedup']:.2f}x counted {row['counted_speedup']:.2f}x"
            )
    record = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "seconds": time.perf_counter() - started,
        "model": {
            "source": args.model,
            "num_layers": model.num_layers,
            "exit_layers": list(model.exit_layers),
            "exit_adapter": model.config.exit_adapter,
            "exits_from": args.exits_from,
        },
        "predictor_fit": {"windows": int(len(fit)), "seq_len": args.seq_len, "layers": fits},
        "held_out": {"windows": int(len(inputs)), "seq_len": args.seq_len},
        "base": base,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)
    _plot(rows, args.output.replace(".json", ".png"))


def _plot(rows, path: str) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(10, 4), layout="tight")
    quality, speed = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    styles = {"layer": "o-", "global": "s--"}
    for allocation in styles:
        for exits in (False, True):
            picked = [r for r in rows if r["allocation"] == allocation and r["exits"] == exits]
            if not picked:
                continue
            label = f"{allocation}{' + exits' if exits else ''}"
            x = [r["capacity"] for r in picked]
            quality.plot(
                x, [100 * r["perplexity_increase"] for r in picked], styles[allocation], label=label
            )
            speed.plot(
                x,
                [r["measured_speedup"] for r in picked],
                styles[allocation],
                label=f"{label} measured",
            )
    quality.set_yscale("symlog", linthresh=10)
    quality.set_xlabel("capacity (share of FFNs run)")
    quality.set_ylabel("perplexity increase over the base (%)")
    quality.invert_xaxis()
    quality.legend(fontsize=8)
    speed.axhline(1.0, color="grey", lw=0.8)
    speed.set_xlabel("capacity (share of FFNs run)")
    speed.set_ylabel("measured decode speedup (batch 1)")
    speed.invert_xaxis()
    speed.legend(fontsize=8)
    figure.suptitle("SmolLM2-135M, FFN skip routers on the frozen base")
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
