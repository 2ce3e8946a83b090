"""Exit evaluation: per-token exit layers for each criterion and threshold, and quality.

The model runs once over the held-out windows at full depth. For every token and every
exit it records the target log-probability, whether the exit's argmax is right, and the
confidence of each criterion (from the cheap head by default). A sweep then decides,
for each (criterion, threshold), the first exit whose confidence passes, and scores the
prediction *of that exit*. Deeper layers still see every token's full-depth state here,
so the quality is that of the `unfrozen` decoding mode (DESIGN.md §3).
"""

import numpy as np
from keras import ops

from toex_tf.analysis.cost import CostModel
from toex_tf.inference.criteria import CRITERIA, first_passing, validate_threshold
from toex_tf.layers.top_k_confidence_gate import TopKConfidenceGate
from toex_tf.models.gpt import with_exit_signals

CONFIDENCE_SOURCES = ("cheap", "full")


def collect_exit_statistics(
    model,
    inputs: np.ndarray,
    targets: np.ndarray,
    batch_size: int = 16,
    criteria=CRITERIA,
    confidence_source: str = "cheap",
    progress=None,
) -> dict:
    """Runs `model` over `(inputs, targets)` and gathers per-token, per-exit statistics.

    `progress`: None, or `progress(done, total, note)` after each batch
    (`toex_tf.progress.Progress`).

    Returns:
        dict with `log_prob` and `correct` `(tokens, exits)` arrays and `confidence`,
        a dict criterion → `(tokens, exits)` float32 array.
    """
    if confidence_source not in CONFIDENCE_SOURCES:
        raise ValueError(
            f"confidence_source must be one of {CONFIDENCE_SOURCES}; got {confidence_source!r}."
        )
    for criterion in criteria:
        if criterion not in CRITERIA:
            raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}.")
    if inputs.shape != targets.shape or inputs.ndim != 2 or len(inputs) == 0:
        raise ValueError(
            f"inputs and targets must be equal, non-empty 2-D arrays; got {inputs.shape} "
            f"and {targets.shape}."
        )
    vocab = model.config.vocab_size
    if inputs.max() >= vocab or targets.max() >= vocab or min(inputs.min(), targets.min()) < 0:
        raise ValueError(f"token ids must be in [0, vocab_size={vocab}).")
    signal_model = with_exit_signals(model)
    gates = {c: TopKConfidenceGate(criterion=c) for c in criteria}
    log_probs, correct, confidence = [], [], {c: [] for c in criteria}
    for start in range(0, len(inputs), batch_size):
        batch_inputs = inputs[start : start + batch_size]
        batch_targets = targets[start : start + batch_size].reshape(-1)
        outputs = signal_model.predict_on_batch(batch_inputs)
        exit_log_probs, exit_correct, exit_conf = [], [], {c: [] for c in criteria}
        for logits, cheap in zip(outputs["exit_logits"], outputs["cheap_logits"]):
            logits = np.asarray(logits, dtype="float32").reshape(-1, vocab)
            shifted = logits - logits.max(-1, keepdims=True)
            log_norm = np.log(np.exp(shifted).sum(-1))
            rows = np.arange(len(batch_targets))
            exit_log_probs.append(shifted[rows, batch_targets] - log_norm)
            exit_correct.append(logits.argmax(-1) == batch_targets)
            source = cheap if confidence_source == "cheap" else logits
            source = np.asarray(source, dtype="float32").reshape(len(batch_targets), -1)
            for criterion, gate in gates.items():
                exit_conf[criterion].append(ops.convert_to_numpy(gate.confidence(source)))
        log_probs.append(np.stack(exit_log_probs, axis=1))
        correct.append(np.stack(exit_correct, axis=1))
        for criterion in criteria:
            confidence[criterion].append(np.stack(exit_conf[criterion], axis=1))
        if progress is not None:
            done = min(start + batch_size, len(inputs))
            progress(done, len(inputs), f"{done} windows")
    return {
        "log_prob": np.concatenate(log_probs),
        "correct": np.concatenate(correct),
        "confidence": {c: np.concatenate(v) for c, v in confidence.items()},
    }


def exit_indices(confidence: np.ndarray, threshold: float) -> np.ndarray:
    """Index of the first exit whose confidence passes `threshold`; the last otherwise.

    Args:
        confidence: `(tokens, exits)`, the final exit last (its column is not read).
    """
    return first_passing(confidence[:, :-1], threshold, axis=1)


def quality(log_prob: np.ndarray, correct: np.ndarray) -> dict:
    return {
        "perplexity": float(np.exp(-log_prob.mean())),
        "accuracy": float(correct.mean()),
    }


def sweep(stats: dict, exit_layers, cost_model: CostModel, thresholds, criteria=None) -> dict:
    """Exit behaviour, savings and quality for each (criterion, threshold).

    Returns:
        `{"baseline": {...}, "sweeps": [row, ...]}` in the `results.json` layout.
    """
    exit_layers = list(exit_layers)
    num_exits = len(exit_layers)
    rows_index = np.arange(len(stats["log_prob"]))
    baseline = quality(stats["log_prob"][:, -1], stats["correct"][:, -1])
    baseline["num_layers"] = cost_model.num_layers
    exit_costs = cost_model.exit_costs(exit_layers)
    full_cost = cost_model.full_depth_macs
    rows = []
    for criterion in criteria or list(stats["confidence"]):
        for threshold in thresholds:
            validate_threshold(threshold)
            index = exit_indices(stats["confidence"][criterion], threshold)
            counts = np.bincount(index, minlength=num_exits)
            chosen_layers = np.asarray(exit_layers)[index]
            mean_cost = float(exit_costs[index].mean())
            rows.append(
                {
                    "criterion": criterion,
                    "threshold": float(threshold),
                    "avg_exit_layer": float(chosen_layers.mean()),
                    "exit_rate": float((chosen_layers < cost_model.num_layers).mean()),
                    "exit_distribution": {
                        str(layer): float(count / len(index))
                        for layer, count in zip(exit_layers, counts)
                    },
                    "savings": 1.0 - mean_cost / full_cost,
                    "ideal_speedup": full_cost / mean_cost,
                    **quality(
                        stats["log_prob"][rows_index, index], stats["correct"][rows_index, index]
                    ),
                }
            )
    return {"baseline": baseline, "sweeps": rows}


def format_table(results: dict) -> str:
    """A readable table of a sweep."""
    base = results["baseline"]
    lines = [
        f"full depth ({base['num_layers']} layers): perplexity {base['perplexity']:.3f}, "
        f"accuracy {base['accuracy']:.4f}",
        f"{'criterion':<10}{'thresh':>7}{'avg_layer':>10}{'exit_rate':>10}{'savings':>9}"
        f"{'ideal_x':>8}{'ppl':>9}{'ppl_rel':>9}{'acc':>8}",
    ]
    for row in results["sweeps"]:
        lines.append(
            f"{row['criterion']:<10}{row['threshold']:>7.3f}{row['avg_exit_layer']:>10.2f}"
            f"{row['exit_rate']:>10.3f}{row['savings']:>9.3f}{row['ideal_speedup']:>8.2f}"
            f"{row['perplexity']:>9.3f}{row['perplexity'] / base['perplexity'] - 1:>+9.2%}"
            f"{row['accuracy']:>8.4f}"
        )
    return "\n".join(lines)
