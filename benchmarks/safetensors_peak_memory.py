"""Peak memory of `load_llama` on a TinyLlama-1.1B-sized safetensors checkpoint.

    python benchmarks/safetensors_peak_memory.py                  # float32, ~4.4 GB on disk
    python benchmarks/safetensors_peak_memory.py --dtype=bfloat16 --skip_old

Writes a checkpoint of random weights with the TinyLlama-1.1B config (`--preset`; the
`tinyllama` preset: hidden 2048, FFN 5632, 22 layers, 32 heads, 4 kv heads, vocab
32000, untied) under `--directory` (a fresh folder in /tmp by default; deleted at the
end unless `--keep`). The tensors are generated one at a time and written one layer per
shard with `safetensors.numpy.save_file` plus a `model.safetensors.index.json`, so the
writer holds one layer, not the model (`--single_file`: one `model.safetensors`, as
TinyLlama ships, which `save_file` writes from all tensors at once: about twice the
model in the writer).

Then three fresh child processes, so that no other step's memory counts:

- `build`: `import tensorflow`, `build_llama` on the checkpoint's config, no weights
  read: the baseline;
- `load`: `load_llama(directory)` (headers first, then one tensor at a time);
- `old` (unless `--skip_old`): the loader before issue 20: `read_safetensors` (every
  tensor into a dict), `build_llama`, then `assign_hf_weights` from the dict.

Each child reports its RSS after the imports, its peak RSS (`VmHWM` from
/proc/self/status, sampled every 20 ms while it works, and `ru_maxrss` at the end) and
the model's size (the sum of its variables' bytes). Two ratios per row:
`(peak - rss_after_import) / model_bytes` (the memory the model and its loading add to
the process: 1.0 would be the variables alone) and `peak / model_bytes` (everything,
TensorFlow's runtime included). Issue 20 asks for the first below 1.3.

Writes benchmarks/results/safetensors_peak_memory.json.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GB = 1e9


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakSampler:
    """Samples this process's VmRSS and VmHWM every `interval` seconds on a thread (NumPy
    and TensorFlow release the GIL while they copy): the peak and a coarse timeline."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_rss_kb = 0
        self.timeline = []  # (seconds, VmRSS GB) every ~0.5 s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()

    def _run(self):
        last = -1.0
        while not self._stop.is_set():
            rss = _status_kb("VmRSS")
            self.peak_rss_kb = max(self.peak_rss_kb, rss, _status_kb("VmHWM"))
            now = time.perf_counter() - self._start
            if now - last >= 0.5:
                self.timeline.append((round(now, 2), round(rss * 1024 / GB, 3)))
                last = now
            self._stop.wait(self.interval)


# --- The checkpoint ------------------------------------------------------------------------


def hf_tensor_shapes(config) -> list[tuple[str, list]]:
    """`(shard name, [(Hugging Face key, shape), ...])` of a Llama checkpoint: the
    embeddings, one shard per layer, then the final norm and the LM head."""
    hidden, ffn = config.hidden_dim, config.intermediate_dim
    kv_width = config.num_kv_heads * config.head_dim
    query_width = config.num_heads * config.head_dim
    shards = [("embed", [("model.embed_tokens.weight", (config.vocab_size, hidden))])]
    for index in range(config.num_layers):
        prefix = f"model.layers.{index}."
        shards.append(
            (
                f"layer{index:02d}",
                [
                    (prefix + "self_attn.q_proj.weight", (query_width, hidden)),
                    (prefix + "self_attn.k_proj.weight", (kv_width, hidden)),
                    (prefix + "self_attn.v_proj.weight", (kv_width, hidden)),
                    (prefix + "self_attn.o_proj.weight", (hidden, query_width)),
                    (prefix + "mlp.gate_proj.weight", (ffn, hidden)),
                    (prefix + "mlp.up_proj.weight", (ffn, hidden)),
                    (prefix + "mlp.down_proj.weight", (hidden, ffn)),
                    (prefix + "input_layernorm.weight", (hidden,)),
                    (prefix + "post_attention_layernorm.weight", (hidden,)),
                ],
            )
        )
    head = [("model.norm.weight", (hidden,))]
    if not config.tie_embeddings:
        head.append(("lm_head.weight", (config.vocab_size, hidden)))
    shards.append(("head", head))
    return shards


def _random_tensor(rng, key: str, shape: tuple, dtype: str) -> np.ndarray:
    import ml_dtypes  # noqa: PLC0415

    if key.endswith("norm.weight"):
        value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
        value = rng.standard_normal(shape, dtype=np.float32)
        value *= 0.02
    return value.astype(ml_dtypes.bfloat16) if dtype == "bfloat16" else value


def write_checkpoint(directory: str, preset: str, dtype: str, single_file: bool) -> dict:
    """Writes config.json and the random weights; returns what was written."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    from toex_tf.config import llama_preset  # noqa: PLC0415
    from toex_tf.loaders.llama import INDEX_FILE, hf_config_from_llama  # noqa: PLC0415

    config = llama_preset(preset, exit_layers=(), capacity=1.0)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf_config_from_llama(config, dtype), f, indent=2)
    rng = np.random.default_rng(0)
    shards = hf_tensor_shapes(config)
    weight_map, all_tensors, total = {}, {}, 0
    for number, (_, entries) in enumerate(shards, start=1):
        tensors = {key: _random_tensor(rng, key, shape, dtype) for key, shape in entries}
        total += sum(value.nbytes for value in tensors.values())
        if single_file:
            all_tensors.update(tensors)
            continue
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(directory, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if single_file:
        save_file(all_tensors, os.path.join(directory, "model.safetensors"), {"format": "pt"})
    else:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump(index, f)
    return {
        "checkpoint_bytes": total,
        "tensors": sum(len(entries) for _, entries in shards),
        "files": 1 if single_file else len(shards),
    }


# --- The measured children ---------------------------------------------------------------


def child(mode: str, directory: str) -> dict:
    """Runs in a fresh process: imports, then `mode` (build, load or old), measured."""
    import keras  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    from toex_tf.loaders import llama  # noqa: PLC0415
    from toex_tf.models import build_llama  # noqa: PLC0415

    rss_after_import = _status_kb("VmRSS") * 1024
    start = time.perf_counter()
    with PeakSampler() as sampler:
        if mode == "load":
            model = llama.load_llama(directory, load_tokenizer=False)
        else:
            config = llama.llama_config_from_hf(
                llama.read_hf_config(directory), exit_layers=(), capacity=1.0
            )  # load_llama's defaults
            tensors = llama.read_safetensors(directory) if mode == "old" else None
            model = build_llama(config)
            if mode == "old":
                llama.assign_hf_weights(model, tensors, source=directory)
                del tensors
    seconds = time.perf_counter() - start
    model_bytes = sum(
        int(np.prod(variable.shape))
        * np.dtype(keras.backend.standardize_dtype(variable.dtype)).itemsize
        for variable in model.weights
    )
    peak = (
        max(
            sampler.peak_rss_kb,
            _status_kb("VmHWM"),
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        )
        * 1024
    )
    return {
        "mode": mode,
        "seconds": round(seconds, 1),
        "model_bytes": model_bytes,
        "model_variables": len(model.weights),
        "rss_after_import_bytes": rss_after_import,
        "rss_at_end_bytes": _status_kb("VmRSS") * 1024,
        "peak_vmhwm_bytes": _status_kb("VmHWM") * 1024,
        "peak_ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_sampled_bytes": sampler.peak_rss_kb * 1024,
        "peak_bytes": peak,
        "timeline_gb": sampler.timeline,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
    }


def run_child(mode: str, directory: str) -> dict:
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--child={mode}",
        f"--directory={directory}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=environment, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"child {mode} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _row(result: dict, baseline: dict | None) -> dict:
    model_bytes = result["model_bytes"]
    peak = result["peak_bytes"]
    row = {
        **result,
        "ratio_peak_above_import": round(
            (peak - result["rss_after_import_bytes"]) / model_bytes, 3
        ),
        "ratio_peak": round(peak / model_bytes, 3),
    }
    if baseline is not None:  # the loader's own cost over a built, unloaded model
        row["ratio_peak_above_built_model"] = round(
            (peak - baseline["peak_bytes"]) / model_bytes, 3
        )
    return row


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--directory", default=None, help="where to write the checkpoint")
    parser.add_argument("--preset", default="tinyllama", help="a LLAMA_PRESETS name")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--single_file", action="store_true", help="one model.safetensors")
    parser.add_argument("--skip_old", action="store_true", help="no read-everything row")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    parser.add_argument("--output", default=os.path.join(RESULTS, "safetensors_peak_memory.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.directory)), flush=True)
        return

    directory = args.directory or tempfile.mkdtemp(prefix="safetensors_peak_", dir="/tmp")
    try:
        start = time.perf_counter()
        written = write_checkpoint(directory, args.preset, args.dtype, args.single_file)
        written["write_seconds"] = round(time.perf_counter() - start, 1)
        print(
            f"wrote {written['checkpoint_bytes'] / GB:.2f} GB in {written['files']} file(s) "
            f"to {directory} ({written['write_seconds']} s)",
            flush=True,
        )
        rows = []
        baseline = run_child("build", directory)
        rows.append(_row(baseline, None))
        for mode in ("load",) + (() if args.skip_old else ("old",)):
            rows.append(_row(run_child(mode, directory), baseline))
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    import safetensors  # noqa: PLC0415

    with open("/proc/meminfo") as f:
        memory_total = int(f.readline().split()[1]) * 1024
    result = {
        "command": " ".join(["python benchmarks/safetensors_peak_memory.py", *sys.argv[1:]]),
        "preset": args.preset,
        "checkpoint_dtype": args.dtype,
        "model_dtype": "float32",
        "layout": "single file" if args.single_file else "one shard per layer + index",
        **written,
        "goal": "(peak - rss_after_import) / model_bytes < 1.3 while loading (issue 20)",
        "machine": {
            "cpu_count": os.cpu_count(),
            "memory_total_bytes": memory_total,
            "platform": platform.platform(),
            "processor": _cpu_model(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
            "tensorflow": rows[0]["tensorflow"],
            "keras": rows[0]["keras"],
        },
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"\nmodel {rows[0]['model_bytes'] / GB:.2f} GB of variables; checkpoint "
        f"{written['checkpoint_bytes'] / GB:.2f} GB {args.dtype}"
    )
    print(
        f"{'mode':6} {'seconds':>8} {'after import':>13} {'peak':>8} {'(peak-import)/model':>20} "
        f"{'peak/model':>11} {'(peak-built)/model':>19}"
    )
    for row in rows:
        print(
            f"{row['mode']:6} {row['seconds']:>8} {row['rss_after_import_bytes'] / GB:>10.2f} GB "
            f"{row['peak_bytes'] / GB:>5.2f} GB {row['ratio_peak_above_import']:>20} "
            f"{row['ratio_peak']:>11} {row.get('ratio_peak_above_built_model', '-'):>19}"
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
