"""The quality table of a model with FFN skip routers and exit gates: teacher-forced
perplexity per router capacity (and with exits), next to the measured decode speed."""

import numpy as np

from toex_tf.analysis.llama_speed import measure_llama_speed
from toex_tf.calibration.routers import calibrate_routers
from toex_tf.inference.criteria import first_passing
from toex_tf.training.llama_training import forward_exits


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
            choice = first_passing(confidence, threshold)
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


def quality_table(
    model,
    data,
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
    return {"base": base, "eval_windows": len(inputs), "rows": rows}


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
