"""The jobs behind `run.py` (TensorFlow): prepare data, train and save, evaluate exits."""

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


def generate_text(
    output_dir: str,
    prompt: str,
    max_new_tokens: int,
    mode: str = "lazy",
    criterion: str = "max_prob",
    threshold: float = 0.2,
    draft_layer: int = 1,
    draft_length: int = 4,
    **sampling,
) -> dict:
    """Generates from `output_dir/model.keras` with its tokenizer; writes `generate.json`.

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
        policy = ExitPolicy(mode, criterion, threshold)
        run = compiled_generate(
            adapter, max_new_tokens, policy, stop_token_ids=[tokenizer.eos_id], **sampling
        )
        token_ids, exit_layers = run(prompt_ids)
    token_ids = np.asarray(token_ids)[0].tolist()
    exit_layers = np.asarray(exit_layers)[0].tolist()
    if tokenizer.eos_id in token_ids:  # drop the stop token and what follows
        cut = token_ids.index(tokenizer.eos_id)
        token_ids, exit_layers = token_ids[:cut], exit_layers[:cut]
    result = {
        "prompt": prompt,
        "text": tokenizer.decode(token_ids),
        "tokens": [
            {"token": tokenizer.decode([t]), "id": t, "exit_layer": layer}
            for t, layer in zip(token_ids, exit_layers)
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
