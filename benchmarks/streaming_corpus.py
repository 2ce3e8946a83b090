"""Memory and throughput of the streamed `text:` corpus path on a generated 1 GB corpus.

Generates `--files` text files of `--file_mb` MB of synthetic English-like text (words
drawn with their frequencies in the Python standard library's docstrings, seeded), then
measures, each phase in a fresh process so its peak RSS (VmHWM) is its own:

1. `prepare`: `prepare_data` on the corpus: tokenizer training (SentencePiece on the first
   32 M characters of training text, or the byte tokenizer) and tokenization into shards.
2. `reuse`: `prepare_data` again, reusing the shards (what a restarted run pays).
3. `feed`: `PreparedData.train_dataset` batches pulled through `tf.data` (tokens/s fed),
   and the time to the first batch when resuming 1.5 epochs in.
4. `in_memory`: today's in-memory path (documents, one id stream, `lm_windows`,
   `make_lm_dataset`) on the first `--slice_files` files, scaled to the whole corpus.

    python benchmarks/streaming_corpus.py  # ~1 GB under /tmp; deleted afterwards

Writes `benchmarks/results/streaming_corpus.json` and prints a summary.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections import Counter

import numpy as np

RESULT = os.path.join(os.path.dirname(__file__), "results", "streaming_corpus.json")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def generate_corpus(directory: str, files: int, file_mb: float, seed: int) -> dict:
    """Writes `files` files of `file_mb` MB each: articles of paragraphs of sentences."""
    from toex_tf.data import builtin_corpus

    words = Counter(re.findall(r"[a-z]+", " ".join(builtin_corpus()).lower()))
    vocabulary, counts = zip(*words.most_common(20_000))
    vocabulary = np.array(vocabulary, dtype=object)
    capitalised = np.array([word.capitalize() for word in vocabulary], dtype=object)
    probabilities = np.array(counts, dtype=np.float64) / sum(counts)
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    start = time.perf_counter()
    for number in range(files):
        path = os.path.join(directory, f"part-{number:03d}.txt")
        size = 0
        with open(path, "w", encoding="utf-8") as file:
            while size < file_mb * 1e6:
                chunk = _text_chunk(rng, vocabulary, capitalised, probabilities, 200_000)
                size += file.write(chunk)
    return {
        "files": files,
        "bytes": sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory)),
        "seconds": time.perf_counter() - start,
    }


def _text_chunk(rng, vocabulary, capitalised, probabilities, num_words: int) -> str:
    """Sentences of 4-24 words, paragraphs of 2-8 sentences, a title every ~12 paragraphs."""
    indices = rng.choice(len(vocabulary), size=num_words, p=probabilities)
    words = vocabulary[indices]
    ends = np.cumsum(rng.integers(4, 25, size=num_words // 4))
    ends = ends[ends < num_words]
    starts = np.concatenate([[0], ends[:-1] + 1])
    words[starts] = capitalised[indices[starts]]
    separators = np.full(num_words, " ", dtype=object)
    separators[ends] = ". "
    picks = np.cumsum(rng.integers(2, 9, size=len(ends)))
    paragraph_ends = np.concatenate([ends[picks[picks < len(ends)]], [num_words - 1]])
    separators[paragraph_ends] = ".\n\n"
    titles = paragraph_ends[rng.random(len(paragraph_ends)) < 1 / 12]
    separators[titles] = ".\n\n## Section\n\n"
    return "".join((words + separators).tolist())


def _data_config(corpus: str, tokenizer: str, vocab_size: int):
    from toex_tf.config import DataConfig

    return DataConfig(
        dataset=f"text:{corpus}/*.txt",
        tokenizer=tokenizer,
        vocab_size=vocab_size if tokenizer == "sentencepiece" else 257,
    )


def phase_prepare(args) -> dict:
    from toex_tf.data.prepared import prepare_data

    baseline = rss_mb()
    start = time.perf_counter()
    prepared = prepare_data(
        _data_config(args.corpus_dir, args.tokenizer, args.vocab_size), args.seq_len, args.run_dir
    )
    seconds = time.perf_counter() - start
    train = prepared.shards.splits["train"]
    validation = prepared.shards.splits["validation"]
    return {
        "seconds": seconds,
        "reused": prepared.shards.reused,
        "train_tokens": train.num_tokens,
        "validation_tokens": validation.num_tokens,
        "train_shards": len(train.paths),
        "documents": prepared.shards.documents,
        "vocab_size": prepared.tokenizer.vocab_size,
        "shard_bytes": sum(os.path.getsize(p) for p in train.paths + validation.paths),
        "rss_after_imports_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
    }


def phase_feed(args) -> dict:
    import toex_tf.data.tf_pipeline  # noqa: F401 - TensorFlow, before the baseline
    from toex_tf.data.prepared import prepare_data

    prepared = prepare_data(
        _data_config(args.corpus_dir, args.tokenizer, args.vocab_size), args.seq_len, args.run_dir
    )
    baseline = rss_mb()
    tokens_per_batch = args.batch_size * args.seq_len
    dataset = prepared.train_dataset(args.batch_size, 0, 0)
    iterator = iter(dataset)
    for _ in range(20):  # warm up: tracing, autotuning
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.batches):
        inputs, _ = next(iterator)
    seconds = time.perf_counter() - start
    windows = prepared.shards.splits["train"].num_windows(args.seq_len)
    skip = int(1.5 * windows) // args.batch_size
    start = time.perf_counter()
    next(iter(prepared.train_dataset(args.batch_size, 0, skip)))
    return {
        "batches": args.batches,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_second": args.batches * tokens_per_batch / seconds,
        "resume_skip_batches": skip,
        "resume_first_batch_seconds": time.perf_counter() - start,
        "rss_before_feeding_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
    }


def phase_in_memory(args) -> dict:
    """The in-memory path on a slice of the corpus, with the streamed run's tokenizer."""
    from toex_tf.data.streaming import iter_text_documents
    from toex_tf.data.tf_pipeline import make_lm_dataset
    from toex_tf.data.token_stream import encode_documents, lm_windows
    from toex_tf.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(os.path.join(args.run_dir, "tokenizer"))
    paths = sorted(os.listdir(args.corpus_dir))[: args.slice_files]
    baseline = rss_mb()
    # The streamed path's documents (a 16 MB file as one document would take SentencePiece
    # far longer), all of them held, then encoded at once as `prepare_data` does.
    documents = list(iter_text_documents([os.path.join(args.corpus_dir, n) for n in paths]))
    stream = encode_documents(documents, tokenizer)
    inputs, targets = lm_windows(stream, args.seq_len)
    dataset = make_lm_dataset(inputs, targets, args.batch_size, True, 0, True)
    iterator = iter(dataset)
    for _ in range(20):
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.batches):
        next(iterator)
    seconds = time.perf_counter() - start
    return {
        "slice_files": len(paths),
        "slice_bytes": sum(os.path.getsize(os.path.join(args.corpus_dir, n)) for n in paths),
        "train_tokens": len(stream),
        "rss_before_data_mb": baseline,
        "peak_rss_mb": peak_rss_mb(),
        "tokens_per_second": args.batches * args.batch_size * args.seq_len / seconds,
    }


PHASES = {"prepare": phase_prepare, "reuse": phase_prepare, "feed": phase_feed}
PHASES["in_memory"] = phase_in_memory


def _run_phase(name: str, argv: list) -> dict:
    """Runs one phase in a fresh process; returns its JSON line."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TOEX_PROGRESS": "0"}
    command = [sys.executable, __file__, f"--phase={name}", *argv]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"phase {name} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _machine() -> dict:
    import sentencepiece
    import tensorflow as tf

    model = platform.processor() or platform.machine()
    with open("/proc/cpuinfo") as cpuinfo:
        names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    with open("/proc/meminfo") as meminfo:
        memory_kb = int(meminfo.readline().split()[1])
    return {
        "cpu": names[0] if names else model,
        "cores": os.cpu_count(),
        "memory_gb": round(memory_kb / 2**20, 1),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "numpy": np.__version__,
        "sentencepiece": sentencepiece.__version__,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus_dir", default="/tmp/toex_streaming_corpus/text")
    parser.add_argument("--run_dir", default="/tmp/toex_streaming_corpus/run")
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--file_mb", type=float, default=16.0)
    parser.add_argument("--tokenizer", default="sentencepiece", choices=["sentencepiece", "byte"])
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--slice_files", type=int, default=4)
    parser.add_argument("--keep_corpus", action="store_true")
    parser.add_argument("--out", default=RESULT)
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return
    argv = [a for a in sys.argv[1:] if not a.startswith("--out")]
    for directory in (args.corpus_dir, args.run_dir):
        if os.path.exists(directory):
            raise SystemExit(f"{directory} exists; remove it or pass another directory.")
    result = {"command": " ".join(["python benchmarks/streaming_corpus.py", *argv])}
    result["date"] = time.strftime("%Y-%m-%d")
    result["machine"] = _machine()
    try:
        result["corpus"] = generate_corpus(args.corpus_dir, args.files, args.file_mb, seed=0)
        print(f"corpus: {result['corpus']}", flush=True)
        for name in ("prepare", "reuse", "feed", "in_memory"):
            result[name] = _run_phase(name, argv)
            print(f"{name}: {result[name]}", flush=True)
    finally:
        if not args.keep_corpus:  # only what this run created
            shutil.rmtree(args.corpus_dir, ignore_errors=True)
            shutil.rmtree(args.run_dir, ignore_errors=True)
    memory = result["in_memory"]
    scale = result["corpus"]["bytes"] / memory["slice_bytes"]
    growth = memory["peak_rss_mb"] - memory["rss_before_data_mb"]
    result["in_memory_estimate"] = {
        "peak_rss_mb": memory["rss_before_data_mb"] + growth * scale,
        "windows_mb": result["prepare"]["train_tokens"] * 4 * 2 / 2**20,
        "note": "slice growth scaled by corpus bytes; windows: train tokens x int32 x 2 "
        "(inputs and targets as tf.constant)",
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as file:
        json.dump(result, file, indent=2)
        file.write("\n")
    prepare, feed = result["prepare"], result["feed"]
    print(
        f"\n{result['corpus']['bytes'] / 1e9:.2f} GB, {prepare['train_tokens']:,} training "
        f"tokens ({args.tokenizer}, vocab {prepare['vocab_size']}):\n"
        f"  prepare   {prepare['seconds']:.0f} s, peak RSS {prepare['peak_rss_mb']:.0f} MB\n"
        f"  reuse     {result['reuse']['seconds']:.1f} s, peak RSS "
        f"{result['reuse']['peak_rss_mb']:.0f} MB\n"
        f"  feed      {feed['tokens_per_second']:,.0f} tokens/s (batch {args.batch_size} x "
        f"{args.seq_len}), peak RSS {feed['peak_rss_mb']:.0f} MB, resume 1.5 epochs in: "
        f"{feed['resume_first_batch_seconds']:.2f} s\n"
        f"  in memory (estimated from {memory['slice_files']} files): peak RSS "
        f"{result['in_memory_estimate']['peak_rss_mb']:,.0f} MB, "
        f"{memory['tokens_per_second']:,.0f} tokens/s\n"
        f"Wrote {args.out}."
    )


if __name__ == "__main__":
    main()
