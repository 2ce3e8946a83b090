"""Can fewer bytes per weight make a batch-1 decode step faster under TensorFlow on this
CPU? A probe of the kernels alone, before building an int8 decode path.

    python benchmarks/weight_dtype_probe.py

One "step" is the 30 layers of SmolLM2-135M's projections (fused QKV 1728 x 576, output
576 x 576, gate and up 1536 x 576, down 576 x 1536; random values), each applied to one
token as `x @ W.T`, with the weights stored as:

- `float32`: 4 bytes per weight (what toex_tf decodes with today);
- `bfloat16`: 2 bytes, the product in bfloat16;
- `int8`: 1 byte, cast to float32 in the graph and scaled per output row afterwards
  (weight-only int8: what `Linear` would do);
- `int8_bf16`: 1 byte, cast to bfloat16 for the product.

Each in graph mode (`tf.function`) and under XLA (`jit_compile=True`), the median of
`--repeats` timings of `--steps` steps, the storage formats alternating. No attention, no
head: only the weight reads that dominate a decode step.

Writes benchmarks/results/weight_dtype_probe.json.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SHAPES = ((1728, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536))
FORMATS = ("float32", "bfloat16", "int8", "int8_bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", default=os.path.join(RESULTS, "weight_dtype_probe.json"))
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf  # noqa: PLC0415

    from toex_tf.analysis.speed import cpu_name  # noqa: PLC0415

    rng = np.random.default_rng(0)
    floats = [[rng.normal(size=s).astype("float32") for s in SHAPES] for _ in range(args.layers)]
    stored = {
        "float32": [[tf.Variable(w) for w in layer] for layer in floats],
        "bfloat16": [[tf.Variable(tf.cast(w, tf.bfloat16)) for w in layer] for layer in floats],
        "int8": [
            [tf.Variable(rng.integers(-127, 128, size=w.shape).astype("int8")) for w in layer]
            for layer in floats
        ],
    }
    stored["int8_bf16"] = stored["int8"]
    scales = [[tf.Variable(rng.random(s[0]).astype("float32")) for s in SHAPES]] * args.layers

    def project(x, weight, scale, storage):
        if storage == "float32":
            return tf.einsum("ij,kj->ik", x, weight)
        if storage == "bfloat16":
            return tf.cast(tf.einsum("ij,kj->ik", tf.cast(x, tf.bfloat16), weight), tf.float32)
        compute = tf.float32 if storage == "int8" else tf.bfloat16
        product = tf.einsum("ij,kj->ik", tf.cast(x, compute), tf.cast(weight, compute))
        return tf.cast(product, tf.float32) * scale

    def build(storage, jit):
        @tf.function(jit_compile=jit)
        def step(x):
            for layer in range(args.layers):
                weights = stored[storage][layer]
                qkv = project(x, weights[0], scales[layer][0], storage)
                out = project(x + qkv[:, :576], weights[1], scales[layer][1], storage)
                gate = project(out, weights[2], scales[layer][2], storage)
                up = project(out, weights[3], scales[layer][3], storage)
                down = project(tf.nn.silu(gate) * up, weights[4], scales[layer][4], storage)
                x = x + 1e-6 * down
            return x

        return step

    x0 = tf.constant(rng.normal(size=(1, 576)).astype("float32"))
    rows = []
    for jit in (False, True):
        steps = {storage: build(storage, jit) for storage in FORMATS}
        for step in steps.values():
            step(x0).numpy()  # trace and compile
        times = {storage: [] for storage in FORMATS}
        for _ in range(args.repeats):
            for storage, step in steps.items():
                start = time.perf_counter()
                for _ in range(args.steps):
                    step(x0).numpy()
                times[storage].append((time.perf_counter() - start) / args.steps)
        reference = float(np.median(times["float32"]))
        for storage in FORMATS:
            seconds = float(np.median(times[storage]))
            row = {
                "storage": storage,
                "compile": "xla" if jit else "graph",
                "ms_per_step": 1e3 * seconds,
                "vs_float32": reference / seconds,
                "weight_mb": sum(a * b for a, b in SHAPES)
                * args.layers
                * {"float32": 4, "bfloat16": 2}.get(storage, 1)
                / 1e6,
            }
            rows.append(row)
            print(
                f"{row['compile']:<5} {storage:<9} {row['ms_per_step']:6.2f} ms/step "
                f"x{row['vs_float32']:.2f} ({row['weight_mb']:.0f} MB of weights)",
                flush=True,
            )
    record = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "tensorflow": tf.__version__,
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
