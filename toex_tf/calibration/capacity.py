"""Searching a model's knobs for a *measured* target: the router calibration capacity
whose decode routes a target share (`match_capacity_on_decode`), the gate shift for a
target decode depth (`match_exit_depth_on_decode`), and the largest capacity whose
measured decode speedup reaches a target (`search_capacity`)."""

import numpy as np

from toex_tf.analysis.speed import compile_generate, time_pair
from toex_tf.calibration.routers import calibrate_routers, exit_depth_threshold, routed_fraction
from toex_tf.inference import DecoderAdapter, ExitPolicy


def match_capacity_on_decode(
    model, run, prompt, calibration, target, iterations: int = 6, allocation: str = "layer"
) -> tuple[float, float]:
    """Bisects the calibration capacity until the routed share of the *generated* tokens
    (greedy, teacher-forced recount of the decode's own decisions) is near `target`.

    Args:
        run: a compiled generate (`compile_generate`) of the routed model; the router
            thresholds are variables, so it reads each trial's without recompiling.
        allocation: how the capacity is shared among the layers (`calibrate_routers`).

    Returns:
        `(calibration_capacity, realized_share)` of the closest trial (thresholds set).
    """
    low, high, capacity = 0.01, 1.0, target
    best = None
    for _ in range(iterations):
        calibrate_routers(model, calibration, capacity, allocation=allocation)
        sequence = np.concatenate([prompt, np.asarray(run(prompt)[0])], axis=1)
        realized = routed_fraction(model, sequence, start=prompt.shape[1])
        if best is None or abs(realized - target) < abs(best[1] - target):
            best = (capacity, realized)
        if realized < target:
            low = capacity
        else:
            high = capacity
        capacity = (low + high) / 2
    calibrate_routers(model, calibration, best[0], allocation=allocation)
    return best


def match_exit_depth_on_decode(model, run, prompt, target, iterations: int = 8):
    """Shifts every exit gate's bias until the decode's average layers per step is near
    `target`; `run` decodes with the `learned` criterion at threshold 0.5.

    A common bias shift `b` at threshold 0.5 is the threshold `sigmoid(-b)` on the
    unshifted gates (the exit test is `logit + b > 0`). The biases are variables, so the
    compiled `run` needs no retrace per trial (a threshold is a compile-time constant).

    Returns:
        `(equivalent_threshold, realized_layers)` of the closest trial (biases left
        shifted by it).
    """
    original = [np.asarray(gate.bias).copy() for gate in model.gates]
    low, high, shift, best = -30.0, 30.0, 0.0, None

    def apply(value):
        for gate, bias in zip(model.gates, original, strict=True):
            gate.bias.assign(bias + value)

    for _ in range(iterations):
        apply(shift)
        state = run(prompt)[2]
        layers = float(state["layers_run"]) / max(float(state["steps"]), 1.0)
        if best is None or abs(layers - target) < abs(best[1] - target):
            best = (shift, layers)
        if layers > target:  # too deep: open the gates more
            low = shift
        else:
            high = shift
        shift = (low + high) / 2
    apply(best[0])
    return float(1.0 / (1.0 + np.exp(best[0]))), best[1]


def search_capacity(
    model,
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
        DecoderAdapter(model, length, routing="all"), new_tokens, ExitPolicy("full")
    )
    adapter = DecoderAdapter(model, length)
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
