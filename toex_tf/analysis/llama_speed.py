"""Decode speed of a `HierarchicalLlama` with FFN skip routers and exits, measured.

Full depth is the same model with every FFN run (`routing="all"`) and no exit, timed
alternately with each setting in the same process (`time_pair`). Counted cost: MACs per
token from `RoutedCost`, with the routed share of FFNs measured on the generated tokens
(teacher-forced, causal routing: the decisions the decode loop made).
"""

from collections.abc import Callable

import numpy as np

from toex_tf.analysis.cost import RoutedCost
from toex_tf.analysis.speed import compile_generate, speed_row, time_pair, time_run
from toex_tf.calibration.capacity import match_capacity_on_decode, match_exit_depth_on_decode
from toex_tf.calibration.routers import calibrate_routers, exit_depth_threshold, routed_fraction
from toex_tf.inference import DecoderAdapter, ExitPolicy


def _checks(exit_layers, avg_layers):
    return float(sum(e <= avg_layers for e in exit_layers[:-1]))


def measure_llama_speed(
    model,
    prompt: np.ndarray,
    calibration: np.ndarray,
    new_tokens: int,
    capacities=(0.9, 0.7, 0.55, 0.4),
    exit_depth: float | None = 12.0,
    mode: str = "frozen",
    repeats: int = 3,
    max_length: int | None = None,
    log: Callable[[str], None] | None = print,
    jit_compile: bool = False,
    match_on_decode: bool = False,
    allocation: str = "layer",
) -> list[dict]:
    """Times full depth, then each capacity without and (with `exit_depth`) with exits.

    Args:
        model: a `HierarchicalLlama` with routers (and gates, for the exit rows).
        prompt: int `(batch, prompt_length)`.
        calibration: int `(n, seq)` tokens that calibrate the router thresholds (and the
            gate threshold reaching an average exit layer of `exit_depth`); None: the
            prompt plus its full-depth continuation (the tokens decoding sees).
        new_tokens: tokens generated per row.
        capacities: routed shares to time.
        exit_depth: the target average exit layer of the exit rows; None: no exit rows.
        mode: the exit mode of the exit rows (`"frozen"` or `"lazy"`).
        repeats: timed calls per setting (median).
        max_length: KV-cache length (default: prompt + new tokens).
        log: called with each row's summary.
        jit_compile: TensorFlow: compile with XLA too.
        match_on_decode: bisect the router capacity and a common gate-bias shift
            (compiled decodes of the same prompt, before timing) until the decode's own
            routed share and average layers are near `capacities` and `exit_depth`;
            otherwise both are calibrated teacher-forced on `calibration` and drift. The
            gates' biases are restored after the run.
        allocation: how a capacity is shared among the layers (`calibrate_routers`).

    Returns:
        Rows (`speed_row` fields plus `capacity`, `exits`, `routed_fraction`,
        `counted_speedup`, `gate_threshold`).
    """
    prompt = np.asarray(prompt, "int32")
    batch, prompt_length = prompt.shape
    length = max_length or prompt_length + new_tokens
    full_adapter = DecoderAdapter(model, length, routing="all")
    adapter = DecoderAdapter(model, length)
    cost = RoutedCost.for_model(model, prompt_length + new_tokens / 2)
    full_run = compile_generate(full_adapter, new_tokens, ExitPolicy("full"), jit_compile)
    full_seconds, full_out = time_run(full_run, prompt, repeats)
    if calibration is None:
        # The decode-time distribution: the prompt and its full-depth continuation.
        calibration = np.concatenate([prompt, np.asarray(full_out[0])], axis=1)
    rows = [
        speed_row(
            batch * new_tokens / full_seconds,
            batch * new_tokens / full_seconds,
            1.0,
            float(cost.num_layers),
            batch,
            mode="full",
            capacity=1.0,
            exits=False,
            routed_fraction=1.0,
            counted_speedup=1.0,
            gate_threshold=None,
        )
    ]
    if log:
        log(f"full depth: {rows[0]['tokens_per_s']:.2f} tok/s")
    settings = [(c, False) for c in capacities]
    if exit_depth is not None:
        settings += [(c, True) for c in capacities]
    routed_run = compile_generate(adapter, new_tokens, ExitPolicy("full"), jit_compile)
    exit_run = None
    if exit_depth is not None and match_on_decode:
        exit_run = compile_generate(adapter, new_tokens, ExitPolicy(mode, "learned", 0.5))
    biases = [np.asarray(gate.bias).copy() for gate in model.gates]
    for capacity, exits in settings:
        for gate, bias in zip(model.gates, biases, strict=True):
            gate.bias.assign(bias)
        if match_on_decode:
            match_capacity_on_decode(
                model, routed_run, prompt, calibration, capacity, allocation=allocation
            )
        else:
            calibrate_routers(model, calibration, capacity, allocation=allocation)
        policy, threshold, run = ExitPolicy("full"), None, routed_run
        if exits and match_on_decode:
            threshold, _ = match_exit_depth_on_decode(model, exit_run, prompt, exit_depth)
            policy, run = ExitPolicy(mode, "learned", 0.5), exit_run
        elif exits:
            threshold = exit_depth_threshold(model, calibration, exit_depth)
            policy = ExitPolicy(mode, "learned", threshold)
            run = compile_generate(adapter, new_tokens, policy, jit_compile)
        seconds, reference, out = time_pair(run, full_run, prompt, repeats)
        tokens = np.concatenate([prompt, np.asarray(out[0])], axis=1)
        routed = routed_fraction(model, tokens, start=prompt_length)
        avg_layers = float(cost.num_layers)
        if exits:
            avg_layers = float(out[2]["layers_run"]) / max(float(out[2]["steps"]), 1.0)
        checks = _checks(model.exit_layers, avg_layers) if exits else 0.0
        counted = cost.full_depth / cost.cost(routed, avg_layers, checks, mode == "frozen")
        row = speed_row(
            batch * new_tokens / seconds,
            batch * new_tokens / reference,
            counted,
            avg_layers,
            batch,
            mode=policy.mode,
            capacity=float(capacity),
            exits=exits,
            routed_fraction=routed,
            counted_speedup=counted,
            gate_threshold=threshold,
        )
        rows.append(row)
        if log:
            log(
                f"capacity {capacity:.2f} exits={exits}: {row['tokens_per_s']:.2f} tok/s, "
                f"x{row['measured_speedup']:.2f} measured, x{counted:.2f} counted, routed "
                f"{routed:.2f}, layers {avg_layers:.1f}"
            )
    for gate, bias in zip(model.gates, biases, strict=True):
        gate.bias.assign(bias)
    return rows
