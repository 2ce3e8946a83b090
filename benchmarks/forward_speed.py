"""Full-sequence forward throughput of an early-exit GPT on the current Keras backend.

Runs on TensorFlow (CPU) and on JAX (the GPU host: `KERAS_BACKEND=jax`). Writes one JSON
row per (preset, batch, seq): tokens/s of a compiled forward pass with every exit head,
plus the max |difference| between KV-cached and uncached attention outputs on this
device (a precision check: GPUs may run float32 matmuls in TF32).

    python benchmarks/forward_speed.py --out=forward_speed.json
"""

import argparse
import json
import os
import platform
import time

import keras
import numpy as np

from toex_tf.layers import CausalSelfAttention
from toex_tf.models import build_gpt


def _device() -> str:
    if keras.backend.backend() == "jax":
        import jax

        return str(jax.devices()[0].device_kind)
    return platform.processor() or platform.machine()


def _compiled_forward(model):
    if keras.backend.backend() == "jax":
        import jax

        def forward(trainable, non_trainable, tokens):
            outputs, _ = model.stateless_call(trainable, non_trainable, tokens)
            return outputs["exit_logits"][-1]

        jitted = jax.jit(forward)
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        return lambda tokens: jitted(trainable, non_trainable, tokens).block_until_ready()
    import tensorflow as tf

    @tf.function(jit_compile=False)
    def forward(tokens):
        return model(tokens)["exit_logits"][-1]

    return lambda tokens: forward(tokens).numpy()


def cache_parity(seq: int = 16) -> float:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, seq, 64)).astype("float32")
    attention = CausalSelfAttention(num_heads=4, head_dim=16, num_kv_heads=2, rope_theta=1e4)
    full = np.asarray(attention(x))
    cache = np.zeros((2, 2, seq, 2, 16), "float32")
    steps = []
    for t in range(seq):
        out, cache = attention(x[:, t : t + 1], cache=cache, cache_update_index=t)
        steps.append(np.asarray(out))
    return float(np.abs(np.concatenate(steps, 1) - full).max())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", default="quickstart,toex-small")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="forward_speed.json")
    args = parser.parse_args()
    rows = []
    for preset in args.presets.split(","):
        model = build_gpt(preset)
        for batch in (int(b) for b in args.batches.split(",")):
            tokens = np.random.default_rng(0).integers(0, 100, (batch, args.seq)).astype("int32")
            forward = _compiled_forward(model)
            forward(tokens)  # compile
            start = time.perf_counter()
            for _ in range(args.repeats):
                forward(tokens)
            seconds = (time.perf_counter() - start) / args.repeats
            rows.append(
                {
                    "preset": preset,
                    "batch": batch,
                    "seq": args.seq,
                    "exits": len(model.exit_layers),
                    "parameters": model.count_params(),
                    "forward_ms": seconds * 1e3,
                    "tokens_per_s": batch * args.seq / seconds,
                    "backend": keras.backend.backend(),
                    "device": _device(),
                }
            )
            print(rows[-1], flush=True)
    result = {
        "rows": rows,
        "cache_parity_max_abs": cache_parity(),
        "device": _device(),
        "backend": keras.backend.backend(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("cache parity max |diff|:", result["cache_parity_max_abs"])


if __name__ == "__main__":
    main()
