"""The jobs behind `run.py` (TensorFlow): prepare data, train and save, evaluate exits,
generate, benchmark decode speed and calibrate the exit threshold."""

import json
import os
from dataclasses import dataclass

import keras
import numpy as np

from toex_tf.analysis.exit_eval import collect_exit_statistics, format_table, sweep
from toex_tf.analysis.flops import CostModel
from toex_tf.analysis.plots import plot_exit_curve
from toex_tf.config import DataConfig, EvalConfig, GPTConfig, TrainConfig
from toex_tf.data import (
    encode_documents,
    lm_windows,
    load_documents,
    load_tokenizer,
    make_tokenizer,
    split_documents,
    token_frequencies,
)
from toex_tf.training.tf_train import train


@dataclass
class PreparedData:
    tokenizer: object
    train_inputs: np.ndarray
    train_targets: np.ndarray
    val_inputs: np.ndarray
    val_targets: np.ndarray
    token_counts: np.ndarray


def prepare_data(data: DataConfig, seq_len: int, output_dir: str, seed: int = 0) -> PreparedData:
    """Loads and splits the corpus, trains (or reloads) the tokenizer, cuts LM windows.

    The tokenizer is trained on the training split only and saved to
    `output_dir/tokenizer`; a later run (resume, eval) reloads it so ids never shift.
    """
    documents = load_documents(data.dataset, data_dir=data.data_dir)
    train_docs, val_docs = split_documents(documents, data.validation_fraction, seed=seed)
    tokenizer_dir = os.path.join(output_dir, "tokenizer")
    if os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        vocab_size = data.vocab_size if data.tokenizer == "sentencepiece" else None
        tokenizer = make_tokenizer(data.tokenizer, train_docs, vocab_size, tokenizer_dir)
    train_stream = encode_documents(train_docs, tokenizer)
    val_stream = encode_documents(val_docs, tokenizer)
    train_inputs, train_targets = lm_windows(train_stream, seq_len)
    val_inputs, val_targets = lm_windows(val_stream, seq_len)
    print(
        f"Data: {len(train_docs)} train / {len(val_docs)} held-out documents, "
        f"{len(train_stream)} / {len(val_stream)} tokens, vocab {tokenizer.vocab_size}."
    )
    return PreparedData(
        tokenizer=tokenizer,
        train_inputs=train_inputs,
        train_targets=train_targets,
        val_inputs=val_inputs,
        val_targets=val_targets,
        token_counts=token_frequencies(train_stream, tokenizer.vocab_size),
    )


def save_model_atomically(model: keras.Model, path: str) -> None:
    """Writes `path` through a temporary file, so a crash never leaves half a model."""
    tmp = path + ".tmp.keras"
    model.save(tmp)
    os.replace(tmp, path)


def train_and_save(
    model_config: GPTConfig, train_config: TrainConfig, data: PreparedData, output_dir: str
) -> keras.Model:
    model = train(
        model_config,
        train_config,
        data.train_inputs,
        data.train_targets,
        output_dir,
        token_counts=data.token_counts,
    )
    save_model_atomically(model, os.path.join(output_dir, "model.keras"))
    print(f"Saved {os.path.join(output_dir, 'model.keras')} ({model.count_params():,} parameters).")
    return model


def load_model(path: str) -> keras.Model:
    """Loads a saved toex_tf model, with a clear error for a missing or corrupt file."""
    if not os.path.exists(path):
        raise ValueError(f"no model at {path!r}: train first (--mode=train).")
    import toex_tf.models  # noqa: F401, PLC0415 - registers the serializable classes

    try:
        return keras.saving.load_model(path)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(
            f"model file {path!r} is corrupt or not a toex_tf model: {error}"
        ) from error


def evaluate_saved(
    output_dir: str,
    data: PreparedData,
    evaluation: EvalConfig,
    max_windows: int,
    batch_size: int,
    config: dict,
) -> dict:
    """Exit sweep of `output_dir/model.keras` on held-out windows.

    Writes `results.json` and `exit_curve.png` to `output_dir`.
    """
    model = load_model(os.path.join(output_dir, "model.keras"))
    inputs = data.val_inputs[:max_windows]
    targets = data.val_targets[:max_windows]
    stats = collect_exit_statistics(
        model,
        inputs,
        targets,
        batch_size=batch_size,
        criteria=evaluation.criteria,
        confidence_source=evaluation.confidence_source,
    )
    # Average attention context of a token in a window of length T: (T + 1) / 2.
    cost_model = CostModel.for_gpt(
        model,
        context_length=(inputs.shape[1] + 1) / 2,
        confidence_source=evaluation.confidence_source,
    )
    swept = sweep(stats, model.exit_layers, cost_model, evaluation.thresholds, evaluation.criteria)
    results = {
        "config": {
            **config,
            "model": {**model.gpt_config.to_dict(), "parameters": model.count_params()},
            "exit_layers": list(model.exit_layers),
            "eval_tokens": int(inputs.size),
            "confidence_source": evaluation.confidence_source,
            "head_cost": model.token_embedding.cost_report(),
            "cost_model_macs": {
                "layer": cost_model.layer_macs,
                "full_head": cost_model.full_head_macs,
                "exit_check": cost_model.check_macs,
            },
        },
        **swept,
    }
    path = os.path.join(output_dir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)
    plot = plot_exit_curve(results, os.path.join(output_dir, "exit_curve.png"))
    print(format_table(results))
    print(f"Wrote {path} and {plot}.")
    return results


def decode_continuation(tokenizer, prompt_ids: list, token_ids: list) -> tuple[str, list]:
    """The text of `token_ids` as a continuation of `prompt_ids`, and each token's piece.

    Decoding generated ids on their own is wrong for SentencePiece: it drops the leading
    space of the first piece ("▁sat" decodes to "sat"). So the continuation is decoded
    after the prompt and the decoded prompt is cut off. A token whose bytes do not yet
    form whole characters (byte tokenizer, multi-byte UTF-8) gets an empty piece, and
    its text is carried by the token that completes it; the pieces join to the text.
    """
    prefix = tokenizer.decode(prompt_ids)
    emitted = prefix
    pieces = []
    for end in range(1, len(token_ids) + 1):
        decoded = tokenizer.decode(prompt_ids + token_ids[:end])
        if decoded.startswith(emitted) and not decoded.endswith("\ufffd"):
            pieces.append(decoded[len(emitted) :])
            emitted = decoded
        else:
            pieces.append("")
    whole = tokenizer.decode(prompt_ids + token_ids)
    if not whole.startswith(prefix):  # the prompt decodes differently in context
        return tokenizer.decode(token_ids), [tokenizer.decode([t]) for t in token_ids]
    text = whole[len(prefix) :]
    if pieces and whole.startswith(emitted):
        pieces[-1] += whole[len(emitted) :]  # an incomplete character at the very end
    if "".join(pieces) != text:  # decoding is not prefix-stable here: per-token pieces
        pieces = [tokenizer.decode([t]) for t in token_ids]
    return text, pieces


def generate_text(
    output_dir: str,
    prompt: str,
    max_new_tokens: int,
    mode: str = "lazy",
    criterion: str = "max_prob",
    threshold: float = 0.2,
    draft_layer: int = 1,
    draft_length: int = 4,
    policy_options: dict | None = None,
    jit_compile: bool = False,
    **sampling,
) -> dict:
    """Generates from `output_dir/model.keras` with its tokenizer; writes `generate.json`.

    `policy_options` are further `ExitPolicy` fields (decision_layers, max_pending,
    patience, threshold_decay); `jit_compile` compiles the loop with XLA as well.

    Returns:
        `{"prompt", "text", "tokens": [{"token", "id", "exit_layer"}], "settings"}`.
    """
    from toex_tf.inference import DecoderAdapter, ExitPolicy  # noqa: PLC0415
    from toex_tf.inference.speculative import generate_speculative  # noqa: PLC0415
    from toex_tf.inference.tf_decode import compiled_generate  # noqa: PLC0415

    model = load_model(os.path.join(output_dir, "model.keras"))
    tokenizer = load_tokenizer(os.path.join(output_dir, "tokenizer"))
    prompt_ids = np.asarray([tokenizer.encode(prompt)], dtype="int32").reshape(1, -1)
    adapter = DecoderAdapter.from_gpt(model)
    if mode == "speculative":
        if sampling.get("sampling", "greedy") != "greedy":
            raise ValueError("speculative decoding is greedy: use --sampling=greedy.")
        token_ids, exit_layers = generate_speculative(
            adapter, prompt_ids, max_new_tokens, draft_layer, draft_length
        )
    else:
        policy = ExitPolicy(mode, criterion, threshold, **(policy_options or {}))
        run = compiled_generate(
            adapter,
            max_new_tokens,
            policy,
            jit_compile=jit_compile,
            stop_token_ids=[tokenizer.eos_id],
            **sampling,
        )
        token_ids, exit_layers = run(prompt_ids)
    token_ids = np.asarray(token_ids)[0].tolist()
    exit_layers = np.asarray(exit_layers)[0].tolist()
    if tokenizer.eos_id in token_ids:  # drop the stop token and what follows
        cut = token_ids.index(tokenizer.eos_id)
        token_ids, exit_layers = token_ids[:cut], exit_layers[:cut]
    text, pieces = decode_continuation(tokenizer, prompt_ids[0].tolist(), token_ids)
    result = {
        "prompt": prompt,
        "text": text,
        "tokens": [
            {"token": piece, "id": t, "exit_layer": layer}
            for piece, t, layer in zip(pieces, token_ids, exit_layers)
        ],
        "num_layers": model.num_layers,
        "settings": {
            "mode": mode,
            "criterion": criterion,
            "threshold": threshold,
            "max_new_tokens": max_new_tokens,
            **(
                {"draft_layer": draft_layer, "draft_length": draft_length}
                if mode == "speculative"
                else {}
            ),
            **sampling,
        },
    }
    path = os.path.join(output_dir, "generate.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    return result


def held_out_prompts(
    data: DataConfig, output_dir: str, count: int, length: int, seed: int = 0
) -> np.ndarray:
    """`count` prompts of `length` tokens, evenly spaced over the held-out split.

    The split is `prepare_data`'s (same documents, fraction and seed), so no prompt comes
    from training text; ids come from the saved tokenizer in `output_dir/tokenizer`.

    Returns:
        int32 `(count, length)`.
    """
    tokenizer_dir = os.path.join(output_dir, "tokenizer")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise ValueError(f"no tokenizer in {tokenizer_dir!r}: train first (--mode=train).")
    tokenizer = load_tokenizer(tokenizer_dir)
    documents = load_documents(data.dataset, data_dir=data.data_dir)
    _, held_out = split_documents(documents, data.validation_fraction, seed=seed)
    stream = encode_documents(held_out, tokenizer)
    if len(stream) <= length:
        raise ValueError(
            f"the held-out split has {len(stream)} tokens; prompt_length={length} needs more. "
            "Use a shorter prompt or a larger validation_fraction."
        )
    starts = np.linspace(0, len(stream) - length - 1, count).astype(int)
    return np.stack([stream[s : s + length] for s in starts]).astype("int32")


def _check_fits(model, prompt_length: int, new_tokens: int, new_tokens_name: str) -> None:
    max_length = model.gpt_config.max_length
    if prompt_length + new_tokens > max_length:
        raise ValueError(
            f"prompt_length={prompt_length} + {new_tokens_name}={new_tokens} exceeds the "
            f"model's max_length={max_length}."
        )


def _write_json(path: str, record: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


def benchmark_saved(
    output_dir: str,
    data: DataConfig,
    modes: tuple = ("frozen", "lazy"),
    criterion: str = "max_prob",
    thresholds: tuple = (0.1, 0.2, 0.3),
    batches: tuple = (1, 8),
    prompt_length: int = 32,
    new_tokens: int = 64,
    repeats: int = 3,
    speculative: tuple = (),
    seed: int = 0,
    policy_options: dict | None = None,
    jit_compile: bool = False,
) -> dict:
    """Decode speed of `output_dir/model.keras` per exit setting against full depth.

    Prompts come from the held-out split. Writes `benchmark.json` (`model`, `settings`,
    `rows`; rows as `toex_tf.inference.timing.measure_decode_speed`) and `benchmark.png`.
    """
    from toex_tf.inference.decoding import ExitPolicy  # noqa: PLC0415
    from toex_tf.inference.timing import (  # noqa: PLC0415
        format_speed_table,
        measure_decode_speed,
        plot_decode_speed,
    )

    model = load_model(os.path.join(output_dir, "model.keras"))
    _check_fits(model, prompt_length, new_tokens, "new_tokens")
    options = policy_options or {}
    policies = [
        ExitPolicy(mode, criterion, float(t), **options) for mode in modes for t in thresholds
    ]
    prompts = {
        batch: held_out_prompts(data, output_dir, batch, prompt_length, seed) for batch in batches
    }
    rows = measure_decode_speed(
        model,
        prompts,
        policies,
        new_tokens,
        repeats=repeats,
        speculative=speculative,
        log=lambda line: print(line, flush=True),
        jit_compile=jit_compile,
    )
    record = {
        "model": {**model.gpt_config.to_dict(), "parameters": model.count_params()},
        "settings": {
            "modes": list(modes),
            "criterion": criterion,
            "thresholds": [float(t) for t in thresholds],
            "batches": list(batches),
            "prompt_length": prompt_length,
            "new_tokens": new_tokens,
            "repeats": repeats,
            "speculative": [list(pair) for pair in speculative],
            "dataset": data.dataset,
            "policy_options": {
                k: list(v) if isinstance(v, tuple) else v for k, v in options.items()
            },
            "jit_compile": jit_compile,
        },
        "rows": rows,
    }
    path = os.path.join(output_dir, "benchmark.json")
    _write_json(path, record)
    plot = plot_decode_speed(
        rows, os.path.join(output_dir, "benchmark.png"), title=f"Decode speed ({criterion})"
    )
    print(format_speed_table(rows))
    print(f"Wrote {path} and {plot}.")
    return record


def calibrate_saved(
    output_dir: str,
    data: DataConfig,
    mode: str = "lazy",
    criterion: str = "max_prob",
    num_prompts: int = 64,
    prompt_length: int = 32,
    max_new_tokens: int = 64,
    target_agreement: float = 0.95,
    method: str = "empirical",
    delta: float = 0.1,
    thresholds: tuple | None = None,
    batch_size: int = 8,
    seed: int = 0,
    policy_options: dict | None = None,
) -> dict:
    """Calibrates the exit threshold of `output_dir/model.keras` on held-out prompts.

    Generation is compiled (`tf.function`, one per threshold) and stops at the
    tokenizer's eos, as `--mode=generate` does. Writes `calibration.json`.

    Returns:
        `{"model", "settings", "calibration"}` (the last: `Calibration.to_dict()`).
    """
    from toex_tf.inference.calibration import calibrate_threshold  # noqa: PLC0415
    from toex_tf.inference.decoding import DecoderAdapter, ExitPolicy  # noqa: PLC0415
    from toex_tf.inference.tf_decode import compiled_generate  # noqa: PLC0415

    if mode not in ("unfrozen", "frozen", "lazy"):
        raise ValueError(
            f"--mode=calibrate needs an exiting --decode_mode (unfrozen, frozen or lazy); "
            f"got {mode!r}."
        )
    model = load_model(os.path.join(output_dir, "model.keras"))
    _check_fits(model, prompt_length, max_new_tokens, "max_new_tokens")
    tokenizer = load_tokenizer(os.path.join(output_dir, "tokenizer"))
    prompts = held_out_prompts(data, output_dir, num_prompts, prompt_length, seed)
    adapter = DecoderAdapter.from_gpt(model)
    stop = [tokenizer.eos_id]

    def run_fn(policy):
        return compiled_generate(
            adapter, max_new_tokens, policy, stop_token_ids=stop, return_state=True
        )

    calibration = calibrate_threshold(
        adapter,
        prompts,
        max_new_tokens,
        ExitPolicy(mode, criterion, **(policy_options or {})),
        target_agreement=target_agreement,
        thresholds=thresholds,
        method=method,
        delta=delta,
        run_fn=run_fn,
        stop_token_ids=stop,
        batch_size=batch_size,
    )
    record = {
        "model": {**model.gpt_config.to_dict(), "parameters": model.count_params()},
        "settings": {
            "mode": mode,
            "criterion": criterion,
            "num_prompts": int(prompts.shape[0]),
            "prompt_length": prompt_length,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "dataset": data.dataset,
        },
        "calibration": calibration.to_dict(),
    }
    path = os.path.join(output_dir, "calibration.json")
    _write_json(path, record)
    print(f"{'threshold':>9} {'agreement':>9} {'layers':>7} {'p_value':>9}")
    for row in calibration.rows:
        p_value = "" if row["p_value"] is None else f"{row['p_value']:.3g}"
        print(
            f"{row['threshold']:>9g} {row['agreement']:>9.3f} {row['avg_layers']:>7.2f} "
            f"{p_value:>9}"
        )
    guarantee = {True: ", certified", False: ", NOT certified", None: ""}[calibration.guaranteed]
    print(
        f"Chosen threshold: {calibration.threshold:g} ({mode}/{criterion}, {method}{guarantee}): "
        f"agreement {calibration.agreement:.3f} with full depth at "
        f"{calibration.avg_layers:.2f} of {model.num_layers} layers per step. "
        f"{calibration.note}"
    )
    print(f"Wrote {path}.")
    return record


def train_gates_saved(
    output_dir: str,
    data: PreparedData,
    windows: int = 512,
    epochs: int = 5,
    hidden_units: int = 0,
    batch_size: int = 16,
) -> dict:
    """Adds `LearnedExitGate`s to `output_dir/model.keras` (if it has none) and fits them.

    The base model is frozen: only the gates train, on the consistency of each exit's
    top-1 with the final layer's (CALM). The model is saved back atomically with its
    gates, so `--decode_criterion=learned` can use them. Writes `gates.json`.
    """
    from toex_tf.models import add_learned_gates  # noqa: PLC0415
    from toex_tf.training.gate_training import fit_learned_gates  # noqa: PLC0415

    path = os.path.join(output_dir, "model.keras")
    model = load_model(path)
    has_gates = any(getattr(b, "learned_gate", None) is not None for b in model.blocks)
    if not has_gates:
        model = add_learned_gates(model, hidden_units=hidden_units)
    report = fit_learned_gates(
        model,
        data.train_inputs[:windows],
        epochs=epochs,
        batch_size=batch_size,
        validation_inputs=data.val_inputs[: max(windows // 4, 1)],
    )
    save_model_atomically(model, path)
    report = json.loads(json.dumps(report, default=float))  # numpy scalars → JSON
    _write_json(os.path.join(output_dir, "gates.json"), report)
    for layer, metrics in report.get("validation", {}).items():
        print(
            f"exit {layer}: held-out AUC {metrics['auc']:.3f}, accuracy "
            f"{metrics['accuracy']:.3f}, consistent share {metrics['positive_rate']:.3f}"
        )
    print(f"Saved {path} with learned gates; wrote {os.path.join(output_dir, 'gates.json')}.")
    return report
