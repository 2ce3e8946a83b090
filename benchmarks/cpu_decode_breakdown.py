"""Where a batch-1 full-depth decode step of the TinyLlama config goes, against HF.

    python benchmarks/cpu_decode_breakdown.py --out=benchmarks/results/cpu_decode_breakdown.json

Three measurements, each side by side in this run:

1. Prefill and decode step, ours (TensorFlow graph mode) and HF `transformers` (torch,
   timed in a child process: `hf_reference.py`): the time of 1 and of `--new_tokens` new
   tokens after a 16-token prompt (median of `--repeats`); decode step = the difference
   over `new_tokens - 1`.
2. Per-op overhead: the same 22-layer decode with width 64 (the matmuls nearly free).
3. The fp32 GEMV kernel: 60 distinct 2048x2048 matrices applied in a chain to one row
   (about 1 GB, so mostly not cache-resident), TensorFlow (`(out, in)` read transposed,
   as `Linear` does, and `(in, out)` as `Dense` does) against torch `F.linear`.
"""

import argparse
import json
import os

import keras
import numpy as np
from hf_reference import generate_timing, time_transformers_isolated

from toex_tf.analysis.speed import compile_generate, device_name, time_run
from toex_tf.config import llama_preset
from toex_tf.inference import DecoderAdapter, ExitPolicy
from toex_tf.inference.tf_threads import use_core_parallel_decoding
from toex_tf.loaders import hf_config_from_llama
from toex_tf.models import build_llama


def _median_seconds(run, repeats):
    return time_run(lambda _: run(), None, repeats)[0]


def ours(prompt, new_tokens, repeats, **overrides):
    keras.utils.set_random_seed(0)
    length = prompt.shape[1] + new_tokens
    model = build_llama("tinyllama", max_length=length, **overrides)
    adapter = DecoderAdapter(model, length, routing="all")
    one = compile_generate(adapter, 1, ExitPolicy("full"))
    many = compile_generate(adapter, new_tokens, ExitPolicy("full"))
    return (
        _median_seconds(lambda: np.asarray(one(prompt)[0]), repeats),
        _median_seconds(lambda: np.asarray(many(prompt)[0]), repeats),
    )


def gemv(repeats, count=60, width=2048):
    import tensorflow as tf  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import torch.nn.functional as functional  # noqa: PLC0415

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((width, width), dtype=np.float32) for _ in range(count)]
    row = rng.standard_normal((1, width), dtype=np.float32)
    out_in = [tf.Variable(w) for w in weights]
    in_out = [tf.Variable(np.ascontiguousarray(w.T)) for w in weights]
    x = tf.constant(row)

    @tf.function
    def tf_out_in():
        y = x
        for w in out_in:
            y = tf.matmul(y, w, transpose_b=True) * 1e-2
        return y

    @tf.function
    def tf_in_out():
        y = x
        for w in in_out:
            y = tf.matmul(y, w) * 1e-2
        return y

    torch.set_num_threads(os.cpu_count())
    torch_weights = [torch.from_numpy(w) for w in weights]
    torch_row = torch.from_numpy(row)

    def torch_chain():
        with torch.no_grad():
            y = torch_row
            for w in torch_weights:
                y = functional.linear(y, w) * 1e-2
        return y

    per = {}
    for name, run in (
        ("tf_out_in_ms", lambda: tf_out_in().numpy()),
        ("tf_in_out_ms", lambda: tf_in_out().numpy()),
        ("torch_ms", torch_chain),
    ):
        per[name] = 1e3 * _median_seconds(run, repeats) / count
    return per


def _row(timing):
    """The JSON row of a `generate_timing` (prefill in ms)."""
    return {
        "prefill_plus_1_ms": 1e3 * timing["prefill_plus_1_s"],
        "tokens_per_s": timing["tokens_per_s"],
        "decode_step_ms": timing["decode_step_ms"],
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="cpu_decode_breakdown.json")
    parser.add_argument(
        "--core_parallel",
        action="store_true",
        help="one thread per op, row-split products (toex_tf.inference.tf_threads)",
    )
    args = parser.parse_args()
    threading = "default"
    if args.core_parallel:
        threading = f"core_parallel x{use_core_parallel_decoding()}"
    prompt = np.random.default_rng(0).integers(0, 32000, (1, 16)).astype("int32")
    n = args.new_tokens

    one, many = ours(prompt, n, args.repeats)
    row = _row(generate_timing(one, many, prompt.shape[0], n))
    print(f"ours: {row}", flush=True)
    small_one, small_many = ours(
        prompt, n, args.repeats, hidden_dim=64, intermediate_dim=128, num_heads=4, num_kv_heads=2
    )
    overhead = 1e3 * (small_many - small_one) / (n - 1)
    print(f"22 layers of width 64 (overhead): {overhead:.2f} ms/step", flush=True)
    timed = time_transformers_isolated(
        hf_config_from_llama(llama_preset("tinyllama")), prompt, n, args.repeats
    )
    version = timed["version"]
    hf = _row(timed)
    print(f"transformers {version} (child process): {hf}", flush=True)
    kernels = gemv(args.repeats)
    print(f"GEMV 2048x2048 fp32 per product: {kernels}", flush=True)
    result = {
        "config": "tinyllama (random weights, fp32, batch 1, 16-token prompt)",
        "new_tokens": n,
        "repeats": args.repeats,
        "device": device_name(),
        "threading": threading,
        "ours": row,
        "ours_width64_overhead_step_ms": overhead,
        "transformers": {"version": version, **hf},
        "ours_over_transformers_tokens_per_s": row["tokens_per_s"] / hf["tokens_per_s"],
        "gemv_2048": kernels,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
