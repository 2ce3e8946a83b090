"""Decode-speed measurement: each exit setting timed against full depth, side by side.

Shared by `benchmarks/decode_speed.py` and `python -m toex_tf.run --mode=benchmark`.
One row per (mode, criterion, threshold, batch size): tokens/s, the full-depth tokens/s
measured in the same run, measured speedup, ideal speedup (counted compute: full depth
over what the mode ran, overhead of exit checks and frozen K/V projections included, a
lazy catch-up window counted as one pass per layer), realized/ideal and average layers.

The decode loop is compiled whole: `tf.function` on TensorFlow, `jax.jit` on JAX (chosen
by `keras.backend.backend()`; neither is imported at module level).
"""

import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence

import keras
import numpy as np

from toex_tf.analysis.cost import CostModel
from toex_tf.inference.adapter import DecoderAdapter
from toex_tf.inference.compiled import compiled_generate, compiled_speculative
from toex_tf.inference.policy import ExitPolicy

ROW_FIELDS = (
    "batch",
    "tokens_per_s",
    "full_tokens_per_s",
    "measured_speedup",
    "ideal_speedup",
    "realized_over_ideal",
    "avg_layers",
    "backend",
    "device",
)


def cpu_name() -> str:
    """The CPU's model name (`/proc/cpuinfo`), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def device_name() -> str:
    """The accelerator kind under JAX, else the CPU architecture and core count."""
    if keras.backend.backend() == "jax":
        import jax  # noqa: PLC0415 - only on the JAX backend

        return str(jax.devices()[0].device_kind)
    return f"{platform.machine()} CPU x{os.cpu_count()}"


def compile_generate(
    adapter: DecoderAdapter, new_tokens: int, policy: ExitPolicy, jit_compile: bool = False
) -> Callable:
    """A compiled `(prompt) -> (tokens, exit_layers, state)` for one policy (greedy),
    returning NumPy (so a call is synchronous)."""
    return compiled_generate(
        adapter, new_tokens, policy, jit_compile, numpy_outputs=True, return_state=True
    )


def compile_speculative(
    adapter: DecoderAdapter,
    new_tokens: int,
    draft_layer: int,
    draft_length: int,
    jit_compile: bool = False,
) -> Callable:
    """A compiled speculative `(prompt) -> (tokens, exit_layers, state)` (LayerSkip)."""
    return compiled_speculative(
        adapter, new_tokens, draft_layer, draft_length, jit_compile, True, return_state=True
    )


def time_pair(run: Callable, reference: Callable, prompt, repeats: int):
    """Times `run` and `reference` alternately, so machine drift hits both alike.

    Returns:
        `(seconds, reference_seconds, output of run's last call)`: medians over
        `repeats` alternating calls after one warm-up call each.
    """
    run(prompt)
    reference(prompt)
    times, reference_times, out = [], [], None
    for _ in range(repeats):
        start = time.perf_counter()
        reference(prompt)
        reference_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = run(prompt)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), float(np.median(reference_times)), out


def time_run(run: Callable, prompt, repeats: int) -> tuple[float, object]:
    """Median wall time of `run(prompt)` over `repeats` calls after one warm-up call.

    Returns:
        `(seconds, output of the last call)`.
    """
    run(prompt)  # compile and warm up
    times = []
    out = None
    for _ in range(repeats):
        start = time.perf_counter()
        out = run(prompt)
        times.append(time.perf_counter() - start)
    return float(np.median(times)), out


def speed_row(
    tokens_per_s: float,
    full_tokens_per_s: float,
    ideal_speedup: float,
    avg_layers: float,
    batch: int,
    **setting,
) -> dict:
    """One JSON row: the setting, then the measured and counted figures (`ROW_FIELDS`)."""
    measured = tokens_per_s / full_tokens_per_s
    return {
        **setting,
        "batch": batch,
        "tokens_per_s": tokens_per_s,
        "full_tokens_per_s": full_tokens_per_s,
        "measured_speedup": measured,
        "ideal_speedup": ideal_speedup,
        "realized_over_ideal": measured / ideal_speedup,
        "avg_layers": avg_layers,
        "backend": keras.backend.backend(),
        "device": device_name(),
    }


def mode_cost(
    cost: CostModel,
    decision_layers: Sequence[int],
    policy: ExitPolicy,
    avg_layers: float,
    kv_fraction: float,
) -> float:
    """Counted MACs per token of `policy` at `avg_layers` layers per step.

    Exit checks: `unfrozen` checks every decision exit below the last layer; `frozen`
    and `lazy` check the ones they reach (those at or below `avg_layers`). `frozen`
    also projects K and V (`kv_fraction` of a layer) for each skipped layer.
    """
    num_layers = cost.num_layers
    checked = [e for e in decision_layers if e < num_layers]
    if policy.mode == "full":
        checks = 0.0
    elif policy.mode == "unfrozen":
        checks = float(len(checked))
    else:
        checks = float(sum(e <= avg_layers for e in checked))
    skipped = num_layers - avg_layers
    kv = skipped * kv_fraction * cost.layer_macs if policy.mode == "frozen" else 0.0
    return avg_layers * cost.layer_macs + checks * cost.check_macs + cost.full_head_macs + kv


def format_row(row: dict) -> str:
    """One readable line of a speed row."""
    if row["mode"] == "speculative":
        name = f"spec {row['draft_layer']}:{row['draft_length']}"
        extra = f", accepted/round {row['accepted_per_round']:.2f}"
    else:
        name = f"{row['mode']:<9}{str(row['threshold']):>6}"
        extra = ""
    return (
        f"{name} b={row['batch']} {row['tokens_per_s']:8.1f} tok/s  "
        f"x{row['measured_speedup']:.2f} (ideal x{row['ideal_speedup']:.2f}, "
        f"layers {row['avg_layers']:.2f}{extra})"
    )


def format_speed_table(rows: Sequence[dict]) -> str:
    """The rows as a fixed-width table."""
    header = (
        f"{'mode':<12}{'criterion':<10}{'threshold':>9}{'batch':>6}{'tok/s':>10}"
        f"{'speedup':>9}{'ideal':>7}{'realized':>9}{'layers':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        mode = row["mode"]
        if mode == "speculative":
            mode = f"spec {row['draft_layer']}:{row['draft_length']}"
        threshold = "" if row["threshold"] is None else f"{row['threshold']:g}"
        lines.append(
            f"{mode:<12}{row['criterion'] or '':<10}{threshold:>9}{row['batch']:>6}"
            f"{row['tokens_per_s']:>10.1f}{row['measured_speedup']:>9.2f}"
            f"{row['ideal_speedup']:>7.2f}{row['realized_over_ideal']:>9.2f}"
            f"{row['avg_layers']:>8.2f}"
        )
    return "\n".join(lines)


def measure_decode_speed(
    model,
    prompts_by_batch: Mapping[int, np.ndarray],
    policies: Sequence[ExitPolicy],
    new_tokens: int,
    repeats: int = 3,
    speculative: Sequence[tuple[int, int]] = (),
    log: Callable[[str], None] | None = print,
    jit_compile: bool = False,
    max_length: int | None = None,
) -> list[dict]:
    """Times each policy (and speculative setting) against full depth, per batch size.

    For each batch size: full depth first (its row has `mode="full"`), then every policy
    in order (a `"full"` policy is not timed twice), then each `(draft_layer,
    draft_length)` of `speculative`. Greedy decoding, no stop tokens, so every run
    produces `batch * new_tokens` tokens.

    Args:
        model: an `EarlyExitGPT` (its config feeds the counted cost).
        prompts_by_batch: `{batch_size: int prompts (batch_size, prompt_length)}`.
        policies: the exit settings to time.
        new_tokens: int > 0, tokens generated per row.
        repeats: timed calls per setting (the median is kept), after one warm-up.
        speculative: `(draft_layer, draft_length)` pairs.
        log: called with one line per row as it is measured; None: silent.
        jit_compile: TensorFlow: compile every run (full depth too) with XLA.
        max_length: the KV-cache length; None: the model's (a long-context model then
            attends over every slot: pass prompt plus new tokens, plus draft room).

    Full depth is timed alternately with each setting (`time_pair`), and each row's
    `full_tokens_per_s` is the one measured beside it.

    Returns:
        Rows: `mode`, `criterion`, `threshold` (speculative: also `draft_layer`,
        `draft_length`, `accepted_per_round`), then `ROW_FIELDS`.

    Example:
        >>> rows = measure_decode_speed(
        ...     model, {1: prompt}, [ExitPolicy("lazy", "max_prob", 0.2)], new_tokens=32
        ... )
        >>> rows[1]["measured_speedup"], rows[1]["ideal_speedup"]
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens <= 0:
        raise ValueError(f"new_tokens must be an int > 0; got {new_tokens!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats <= 0:
        raise ValueError(f"repeats must be an int > 0; got {repeats!r}.")
    if not prompts_by_batch:
        raise ValueError("prompts_by_batch must hold at least one batch; got none.")
    adapter = DecoderAdapter(model, max_length=max_length)
    config = model.config
    full_policy = ExitPolicy("full")
    rows = []
    for batch, prompt in prompts_by_batch.items():
        prompt = np.asarray(prompt, dtype="int32")
        if prompt.ndim != 2 or prompt.shape[0] != batch:
            raise ValueError(
                f"prompts_by_batch[{batch}] must have shape ({batch}, prompt_length); got "
                f"{prompt.shape}."
            )
        # Average attention context over the generated tokens.
        cost = CostModel.for_gpt(model, context_length=prompt.shape[1] + new_tokens / 2)
        d = config.hidden_dim
        kv_fraction = (2 * d * d) / cost.layer_macs  # K and V projections of one layer
        full_run = compile_generate(adapter, new_tokens, full_policy, jit_compile)
        full_time, _ = time_run(full_run, prompt, repeats)
        full_tps = batch * new_tokens / full_time
        for policy in [full_policy] + [p for p in policies if p.mode != "full"]:
            if policy.mode == "full":
                seconds, avg_layers = full_time, float(config.num_layers)
                row_full_tps = full_tps
            else:
                run = compile_generate(adapter, new_tokens, policy, jit_compile)
                seconds, full_seconds, out = time_pair(run, full_run, prompt, repeats)
                row_full_tps = batch * new_tokens / full_seconds
                avg_layers = float(out[2]["layers_run"]) / max(float(out[2]["steps"]), 1.0)
            decisions = adapter.decision_layers(policy)
            ideal = cost.full_depth_macs / mode_cost(
                cost, decisions, policy, avg_layers, kv_fraction
            )
            row = speed_row(
                batch * new_tokens / seconds,
                row_full_tps,
                ideal,
                avg_layers,
                batch,
                mode=policy.mode,
                criterion=None if policy.mode == "full" else policy.criterion,
                threshold=None if policy.mode == "full" else float(policy.threshold),
                decision_layers=list(decisions),
                max_pending=policy.max_pending if policy.mode == "lazy" else None,
                jit_compile=jit_compile,
            )
            rows.append(row)
            if log:
                log(format_row(row))
        for draft_layer, draft_length in speculative:
            run = compile_speculative(adapter, new_tokens, draft_layer, draft_length, jit_compile)
            seconds, full_seconds, out = time_pair(run, full_run, prompt, repeats)
            rounds = max(float(out[2]["rounds"]), 1.0)
            # Sequential layer passes: the draft runs k layers per drafted token, the
            # verification one windowed pass through the other L - k layers.
            passes = rounds * (draft_length * draft_layer + config.num_layers - draft_layer)
            avg_layers = passes / max(new_tokens - 1, 1)
            row = speed_row(
                batch * new_tokens / seconds,
                batch * new_tokens / full_seconds,
                config.num_layers / avg_layers,
                avg_layers,
                batch,
                mode="speculative",
                criterion=None,
                threshold=None,
                draft_layer=draft_layer,
                draft_length=draft_length,
                accepted_per_round=float(out[2]["accepted"]) / rounds,
                jit_compile=jit_compile,
            )
            rows.append(row)
            if log:
                log(format_row(row))
    return rows


def plot_decode_speed(rows: Sequence[dict], path: str, title: str = "Decode speed") -> str:
    """Measured and ideal speedup over full depth, one panel per batch size; a PNG.

    Bars: measured (solid) and ideal (hatched) speedup of each setting, with its tokens/s
    written on top; the dashed line is full depth (x1).

    Returns:
        `path`.
    """
    # The object API: no pyplot, no backend switch in the caller's process.
    from matplotlib.figure import Figure  # noqa: PLC0415 - plotting is optional

    batches = list(dict.fromkeys(row["batch"] for row in rows))
    settings = [r for r in rows if r["mode"] != "full"]
    width = max(4.0, 0.9 * len(settings) / max(len(batches), 1) + 2.0)
    figure = Figure(figsize=(width * len(batches), 4.4), dpi=120, layout="tight")
    axes = figure.subplots(1, len(batches), squeeze=False)
    for axis, batch in zip(axes[0], batches):
        shown = [r for r in rows if r["batch"] == batch and r["mode"] != "full"]
        labels = [
            f"speculative\n{r['draft_layer']}:{r['draft_length']}"
            if r["mode"] == "speculative"
            else f"{r['mode']}\nt={r['threshold']:g}\n{r['avg_layers']:.2f} layers"
            for r in shown
        ]
        x = np.arange(len(shown))
        measured = [r["measured_speedup"] for r in shown]
        ideal = [r["ideal_speedup"] for r in shown]
        axis.bar(x - 0.2, measured, 0.4, label="measured", color="tab:blue")
        axis.bar(
            x + 0.2,
            ideal,
            0.4,
            label="ideal (counted)",
            color="white",
            edgecolor="tab:orange",
            hatch="//",
        )
        for i, r in enumerate(shown):
            axis.annotate(
                f"{r['tokens_per_s']:.0f}/s",
                (x[i] - 0.2, measured[i]),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        full = next((r for r in rows if r["batch"] == batch and r["mode"] == "full"), None)
        subtitle = f"batch {batch}"
        if full is not None:
            subtitle += f" (full depth {full['tokens_per_s']:.0f} tok/s)"
        axis.set_title(subtitle, fontsize=10)
        axis.set_xticks(x, labels, fontsize=8)
        axis.set_ylabel("speedup over full depth (x)")
        axis.set_ylim(0, max([1.2, *measured, *ideal]) * 1.15)
        axis.legend(fontsize=8, loc="upper left")
    device = rows[0]["device"] if rows else ""
    figure.suptitle(f"{title} — {device}", fontsize=11)
    figure.savefig(path)
    return path
