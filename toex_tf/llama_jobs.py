"""What `python -m toex_tf.run --model=llama` runs: phases, quality table, speed search.

--phase=base     pretrain a Llama from scratch (a preset) on the corpus, save
                 OUTPUT_DIR/model.keras and a Hugging Face checkpoint OUTPUT_DIR/hf
--phase=routers  from --init_from (a checkpoint handle or a .keras file): train the
                 FFN skip routers on the frozen base, capacity schedule
--phase=exits    train the exit gates and exit norms, routers frozen
--phase=full     routers and gates together
--mode=eval      the quality table: capacity → perplexity increase (and exits), plus
                 measured decode speed → OUTPUT_DIR/llama_results.json
--target_speedup the smallest capacity cut whose *measured* speedup reaches the target
"""

import json
import os
import shutil

import numpy as np

from toex_tf.inference.decoding import DecoderAdapter, ExitPolicy
from toex_tf.inference.llama_timing import measure_llama_speed
from toex_tf.inference.timing import compile_generate, time_pair
from toex_tf.loaders import export_llama, load_llama
from toex_tf.models.llama import HierarchicalLlama, build_llama
from toex_tf.tf_jobs import PreparedData, load_model, save_model_atomically
from toex_tf.training.llama_training import (
    calibrate_routers,
    exit_depth_threshold,
    forward_exits,
    train_phase,
)


def adopt_tokenizer(init_from: str | None, output_dir: str) -> str | None:
    """Copies the tokenizer the base was trained with next to `output_dir`'s model.

    A base phase saves it as `OUTPUT_DIR/tokenizer` and `OUTPUT_DIR/hf/toex_tokenizer`; a
    later phase started from either finds it, so token ids never shift between phases.
    Nothing happens when `output_dir` already has a tokenizer or none is found.
    """
    target = os.path.join(output_dir, "tokenizer")
    if not init_from or os.path.exists(os.path.join(target, "tokenizer.json")):
        return None
    base = init_from if os.path.isdir(init_from) else os.path.dirname(init_from)
    for candidate in (os.path.join(base, "toex_tokenizer"), os.path.join(base, "tokenizer")):
        if os.path.exists(os.path.join(candidate, "tokenizer.json")):
            shutil.copytree(candidate, target)
            return target
    return None


def init_llama(init_from: str, exit_layers, capacity: float, **overrides) -> HierarchicalLlama:
    """A `.keras` file from an earlier phase (kept as saved), or a checkpoint handle."""
    if init_from.endswith(".keras"):
        model = load_model(init_from)
        if not isinstance(model, HierarchicalLlama):
            raise ValueError(f"{init_from!r} holds a {type(model).__name__}, not a Llama.")
        return model
    return load_llama(init_from, exit_layers=exit_layers, capacity=capacity, **overrides)


def run_phase(
    phase: str,
    data: PreparedData,
    output_dir: str,
    steps: int,
    batch_size: int,
    learning_rate: float,
    init_from: str | None = None,
    preset: str = "llama-small",
    exit_layers=(),
    capacity: float = 0.55,
    capacity_start: float | None = 0.9,
    max_windows: int | None = None,
    seed: int = 0,
    **loss_weights,
) -> dict:
    """Trains one phase and saves `OUTPUT_DIR/model.keras` (and `hf/` for `base`)."""
    vocab = data.tokenizer.vocab_size
    if phase == "base":
        if init_from:
            raise ValueError("--phase=base trains from scratch; drop --init_from.")
        model = build_llama(preset, vocab_size=vocab, exit_layers=(), capacity=1.0)
    else:
        if not init_from:
            raise ValueError(f"--phase={phase} needs --init_from (a checkpoint or .keras file).")
        model = init_llama(init_from, exit_layers, capacity)
        if model.llama_config.vocab_size != vocab:
            raise ValueError(
                f"the model's vocabulary ({model.llama_config.vocab_size}) does not match the "
                f"tokenizer's ({vocab}): use the tokenizer the base was trained with."
            )
    inputs, targets = data.train_inputs, data.train_targets
    if max_windows:
        inputs, targets = inputs[:max_windows], targets[:max_windows]
    logs = train_phase(
        model,
        inputs,
        targets,
        phase,
        steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        capacity_start=capacity_start,
        seed=seed,
        verbose=2,
        **loss_weights,
    )
    if model.routers:
        # Decode-time thresholds: the trained capacity's share of training tokens routes.
        calibrate_routers(model, inputs[:64], None)
    if model.llama_config.output_embedding_mode == "shortlist":
        model.token_embedding.set_shortlist_from_counts(data.token_counts)
    os.makedirs(output_dir, exist_ok=True)
    save_model_atomically(model, os.path.join(output_dir, "model.keras"))
    if phase == "base":
        hf_dir = export_llama(model, os.path.join(output_dir, "hf"))
        data.tokenizer.save(os.path.join(hf_dir, "toex_tokenizer"))
        model_file = getattr(data.tokenizer, "model_file", None)
        if model_file:  # a SentencePiece model: where load_llama looks for it
            with (
                open(model_file, "rb") as src,
                open(os.path.join(hf_dir, "tokenizer.model"), "wb") as dst,
            ):
                dst.write(src.read())
    print(f"phase {phase}: {json.dumps({k: v for k, v in logs.items() if k != 'schedule'})}")
    return logs


def perplexity(model, inputs, targets, threshold=None, batch_size: int = 8) -> dict:
    """Teacher-forced perplexity and accuracy under causal routing, optionally with
    exits: each token leaves at the first gate whose confidence passes `threshold`."""
    nll, correct, layers, count = 0.0, 0, 0.0, 0
    exit_layers = np.asarray(model.exit_layers, "float64")
    for start in range(0, len(inputs), batch_size):
        x, y = inputs[start : start + batch_size], targets[start : start + batch_size]
        out = forward_exits(model, x, routing="predictor")
        log_probs = [np.asarray(v, "float64") for v in out["logits"]]
        log_probs = [v - np.logaddexp.reduce(v, axis=-1, keepdims=True) for v in log_probs]
        choice = np.full(y.shape, len(log_probs) - 1)
        if threshold is not None and model.gates:
            confidence = np.stack(
                [np.asarray(g(s)) for g, s in zip(model.gates, out["normed"][:-1], strict=True)]
            )
            passed = np.concatenate([confidence > threshold, np.ones((1,) + y.shape, bool)])
            choice = np.argmax(passed, axis=0)
        chosen = np.take_along_axis(np.stack(log_probs), choice[None, ..., None], axis=0)[0]
        picked = np.take_along_axis(chosen, y[..., None], axis=-1)[..., 0]
        nll -= picked.sum()
        correct += int((chosen.argmax(-1) == y).sum())
        layers += exit_layers[choice].sum()
        count += y.size
    return {
        "perplexity": float(np.exp(nll / count)),
        "accuracy": correct / count,
        "avg_exit_layer": layers / count,
    }


def evaluate(
    model: HierarchicalLlama,
    data: PreparedData,
    output_dir: str,
    capacities=(0.9, 0.7, 0.55, 0.4),
    exit_depth: float | None = None,
    eval_windows: int = 64,
    new_tokens: int = 32,
    repeats: int = 3,
) -> dict:
    """The quality table with measured speed: for each capacity, perplexity against the
    base (routing off, no exit) and decode speedup; with `exit_depth`, again with exits
    at the gate threshold reaching that average exit layer."""
    inputs = data.val_inputs[:eval_windows]
    targets = data.val_targets[:eval_windows]
    calibration = data.train_inputs[:64]
    for router in model.routers:
        router.predictor_threshold.assign(-1e30)  # every FFN: the base
    base = perplexity(model, inputs, targets)
    prompt = data.val_inputs[-1:, :16]
    rows = measure_llama_speed(
        model,
        prompt,
        calibration,
        new_tokens,
        capacities=capacities,
        exit_depth=exit_depth,
        repeats=repeats,
    )
    for row in rows[1:]:
        calibrate_routers(model, calibration, row["capacity"])
        quality = perplexity(model, inputs, targets, row["gate_threshold"])
        row.update(quality)
        row["perplexity_increase"] = quality["perplexity"] / base["perplexity"] - 1.0
    result = {"base": base, "eval_windows": len(inputs), "rows": rows}
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "llama_results.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(format_table(result))
    return result


def format_table(result: dict) -> str:
    lines = [
        f"base perplexity {result['base']['perplexity']:.2f}",
        "capacity exits  routed  layers  speedup(measured/counted)  ppl  increase",
    ]
    for row in result["rows"][1:]:
        lines.append(
            f"{row['capacity']:>8.2f} {str(row['exits']):>5} {row['routed_fraction']:>7.2f} "
            f"{row['avg_layers']:>7.1f}  x{row['measured_speedup']:.2f} / "
            f"x{row['counted_speedup']:.2f}  {row['perplexity']:>8.2f} "
            f"{100 * row['perplexity_increase']:>+6.1f}%"
        )
    return "\n".join(lines)


def search_capacity(
    model: HierarchicalLlama,
    prompt: np.ndarray,
    calibration: np.ndarray,
    target_speedup: float,
    new_tokens: int = 32,
    exit_depth: float | None = None,
    iterations: int = 5,
    repeats: int = 3,
) -> dict:
    """Bisection over capacity in [0.1, 1] for the largest capacity whose *measured*
    decode speedup (paired with full depth) reaches `target_speedup`; with
    `exit_depth`, exits on at that depth's gate threshold."""
    if target_speedup <= 1.0:
        raise ValueError(f"target_speedup must be > 1; got {target_speedup}.")
    length = prompt.shape[1] + new_tokens
    full_run = compile_generate(
        DecoderAdapter.from_llama(model, length, routing="all"), new_tokens, ExitPolicy("full")
    )
    adapter = DecoderAdapter.from_llama(model, length)
    low, high, best, trials = 0.1, 1.0, None, []
    for _ in range(iterations):
        capacity = (low + high) / 2
        calibrate_routers(model, calibration, capacity)
        policy = ExitPolicy("full")
        if exit_depth is not None:
            threshold = exit_depth_threshold(model, calibration, exit_depth)
            policy = ExitPolicy("frozen", "learned", threshold)
        run = compile_generate(adapter, new_tokens, policy)
        seconds, reference, _ = time_pair(run, full_run, prompt, repeats)
        speedup = reference / seconds
        trials.append({"capacity": capacity, "measured_speedup": speedup})
        print(f"capacity {capacity:.3f}: measured x{speedup:.2f}")
        if speedup >= target_speedup:
            best, low = capacity, capacity
        else:
            high = capacity
    if best is not None:
        calibrate_routers(model, calibration, best)
    return {"target_speedup": target_speedup, "capacity": best, "trials": trials}
