"""How far light tuning moved a model at full depth: teacher-forced perplexity of two
models (the base and the tuned one) on in-domain and out-of-domain held-out text.

    python benchmarks/real_model_drift.py --base=runs/smollm2 --tuned=runs/smollm2_lora

- in domain: held-out windows of the built-in corpus (the text the tuning saw the
  training split of);
- out of domain: English UI and help strings, the `msgid`s of the gettext catalogs under
  `/usr/share/locale/ro/LC_MESSAGES` (human-written, never seen by the tuning), read with
  the standard library's `gettext`, sorted and joined one per line.

A fall in perplexity in domain with a rise out of domain means the tuning adapted the
model to its corpus: its exits look better against the base partly for that reason.

Writes benchmarks/results/real_model_drift.json.
"""

import argparse
import gettext
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def catalog_text(pattern: str) -> str:
    """Every English `msgid` of the gettext catalogs matching `pattern`, one per line."""
    messages = set()
    for path in sorted(glob.glob(pattern)):
        with open(path, "rb") as f:
            catalog = gettext.GNUTranslations(f)._catalog  # msgid -> translation
        for key in catalog:
            text = key[0] if isinstance(key, tuple) else key
            if text.strip():
                messages.add(text.strip())
    return "\n".join(sorted(messages))


def perplexity(model, inputs, targets, batch_size: int = 8) -> float:
    """Teacher-forced full-depth perplexity."""
    nll, count = 0.0, 0
    for start in range(0, len(inputs), batch_size):
        logits = np.asarray(model(inputs[start : start + batch_size])["logits"], "float64")
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        y = targets[start : start + batch_size]
        nll -= np.take_along_axis(log_probs, y[..., None], axis=-1).sum()
        count += y.size
    return float(np.exp(nll / count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="runs/smollm2")
    parser.add_argument("--tuned", default="runs/smollm2_lora")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--catalogs", default="/usr/share/locale/ro/LC_MESSAGES/*.mo")
    parser.add_argument("--output", default=os.path.join(RESULTS, "real_model_drift.json"))
    args = parser.parse_args()

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import toex_tf  # noqa: PLC0415
    from toex_tf.analysis.speed import cpu_name  # noqa: PLC0415
    from toex_tf.config import DataConfig  # noqa: PLC0415
    from toex_tf.data.prepared import prepare_data  # noqa: PLC0415
    from toex_tf.data.token_stream import lm_windows  # noqa: PLC0415

    base = toex_tf.load(args.base)
    with tempfile.TemporaryDirectory() as folder:
        data = prepare_data(DataConfig(), args.seq_len, folder, tokenizer=base.tokenizer)
    text = catalog_text(args.catalogs)
    if not text:
        raise SystemExit(f"no gettext catalogs match {args.catalogs!r}.")
    stream = np.asarray(base.tokenizer.encode(text), "int32")
    outside = lm_windows(stream, args.seq_len)
    # Evenly spread windows over the sorted strings, not only the first letters.
    picked = np.linspace(0, len(outside[0]) - 1, args.windows).astype(int)
    sets = {
        "in_domain": (data.val_inputs[: args.windows], data.val_targets[: args.windows]),
        "out_of_domain": (outside[0][picked], outside[1][picked]),
    }
    rows = {}
    for name, source in (("base", args.base), ("tuned", args.tuned)):
        model = base.model if source == args.base else toex_tf.load(source).model
        rows[name] = {
            key: perplexity(model, x.astype("int32"), y.astype("int32"))
            for key, (x, y) in sets.items()
        }
        print(name, rows[name], flush=True)
    drift = {key: rows["tuned"][key] / rows["base"][key] - 1.0 for key in sets}
    record = {
        "command": "python " + " ".join(sys.argv),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "windows": args.windows,
        "seq_len": args.seq_len,
        "out_of_domain_source": f"{args.catalogs}: {len(text.splitlines())} msgids",
        "perplexity": rows,
        "drift": drift,
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(drift))


if __name__ == "__main__":
    main()
