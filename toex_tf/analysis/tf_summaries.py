"""Exit metrics in TensorBoard (`tf.summary`, HParams where settings are swept).

Layout under a run's `tensorboard/` directory (next to training's `train/`):

- `sweep/<criterion>/`: the exit sweep, one point per threshold. TensorBoard's step is an
  integer, so the step is the threshold in thousandths (0.3 → 300). Scalars
  `sweep/perplexity`, `sweep/savings`, `sweep/avg_exit_layer`, `sweep/ideal_speedup`,
  `sweep/exit_rate`, `sweep/accuracy`; histogram `sweep/exit_layer` (the exit layer of
  every held-out token).
- `sweep_hparams/<criterion>_<threshold>/`: the same rows as HParams sessions (criterion
  and threshold as hyperparameters), for the HParams dashboard's table and plots.
- `benchmark/<mode>_<criterion>_batch<b>/`: measured and ideal speedup, realized/ideal,
  average layers and tokens/s per threshold (same step rule); HParams sessions under
  `benchmark_hparams/`.
- `calibration/<mode>_<criterion>/`: the calibration curve (agreement and average layer
  per threshold).

Open with `tensorboard --logdir OUTPUT_DIR/tensorboard`.
"""

import os

import numpy as np
import tensorflow as tf
from tensorboard.plugins.hparams import api as hp


def threshold_step(threshold: float) -> int:
    """The TensorBoard step of a threshold: thousandths (0.3 → 300)."""
    return int(round(float(threshold) * 1000))


def _scalars(writer, prefix, row, names, step):
    with writer.as_default():
        for name in names:
            value = row.get(name)
            if value is not None and np.isfinite(value):
                tf.summary.scalar(f"{prefix}/{name}", float(value), step=step)


def _hparams_session(log_dir, hparams, prefix, row, names):
    with tf.summary.create_file_writer(log_dir).as_default():
        hp.hparams(hparams)
        for name in names:
            value = row.get(name)
            if value is not None and np.isfinite(value):
                tf.summary.scalar(f"{prefix}/{name}", float(value), step=0)


def _name(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


SWEEP_METRICS = (
    "perplexity",
    "accuracy",
    "savings",
    "avg_exit_layer",
    "ideal_speedup",
    "exit_rate",
)


def log_exit_sweep(log_dir: str, results: dict, tokens: int) -> list:
    """Writes an exit sweep (`toex_tf.analysis.exit_eval.sweep` results) to TensorBoard.

    Args:
        log_dir: the run's `tensorboard/` directory.
        results: `{"baseline", "sweeps"}`.
        tokens: held-out tokens the sweep scored (the histogram's sample count).

    Returns:
        The directories written.
    """
    written = []
    rows_by_criterion = {}
    for row in results["sweeps"]:
        rows_by_criterion.setdefault(row["criterion"], []).append(row)
    for criterion, rows in rows_by_criterion.items():
        directory = os.path.join(log_dir, "sweep", criterion)
        writer = tf.summary.create_file_writer(directory)
        for row in sorted(rows, key=lambda r: r["threshold"]):
            step = threshold_step(row["threshold"])
            _scalars(writer, "sweep", row, SWEEP_METRICS, step)
            layers = [int(layer) for layer in row["exit_distribution"]]
            counts = np.round(np.asarray(list(row["exit_distribution"].values())) * tokens)
            with writer.as_default():
                tf.summary.histogram(
                    "sweep/exit_layer",
                    np.repeat(layers, counts.astype(int)).astype("float32"),
                    step=step,
                    buckets=max(layers),
                )
        writer.flush()
        written.append(directory)
        for row in rows:
            session = os.path.join(
                log_dir, "sweep_hparams", f"{criterion}_{_name(row['threshold'])}"
            )
            hparams = {"criterion": criterion, "threshold": float(row["threshold"])}
            _hparams_session(session, hparams, "sweep", row, SWEEP_METRICS)
    return written


BENCHMARK_METRICS = (
    "measured_speedup",
    "ideal_speedup",
    "realized_over_ideal",
    "avg_layers",
    "tokens_per_s",
)


def log_benchmark(log_dir: str, rows: list) -> None:
    """Writes benchmark rows (each with `mode`, `criterion`, `threshold`, `batch` and the
    speedups) to TensorBoard: one run per mode, criterion and batch."""
    for row in rows:
        if row.get("threshold") is None:
            continue
        run = f"{row['mode']}_{row.get('criterion') or 'none'}_batch{row.get('batch', 1)}"
        writer = tf.summary.create_file_writer(os.path.join(log_dir, "benchmark", run))
        _scalars(writer, "benchmark", row, BENCHMARK_METRICS, threshold_step(row["threshold"]))
        writer.flush()
        session = os.path.join(log_dir, "benchmark_hparams", f"{run}_{_name(row['threshold'])}")
        hparams = {
            "mode": row["mode"],
            "criterion": str(row.get("criterion")),
            "threshold": float(row["threshold"]),
            "batch": int(row.get("batch", 1)),
        }
        _hparams_session(session, hparams, "benchmark", row, BENCHMARK_METRICS)


def log_calibration(log_dir: str, run: str, curve: list) -> None:
    """Writes a calibration curve (rows with `threshold` and their metrics) to TensorBoard."""
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "calibration", run))
    for row in curve:
        names = [k for k, v in row.items() if k != "threshold" and isinstance(v, (int, float))]
        _scalars(writer, "calibration", row, names, threshold_step(row["threshold"]))
    writer.flush()
