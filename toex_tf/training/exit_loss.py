"""The joint early-exit loss: weighted cross-entropy at every exit, plus distillation."""

import keras
import numpy as np
from keras import ops

from toex_tf.config import EXIT_WEIGHT_SCHEDULES
from toex_tf.training.multi_worker import MultiWorkerFit, scale_loss_for_replicas


def exit_loss_weights(schedule: str, exit_layers, num_layers: int) -> np.ndarray:
    """Per-exit loss weights that rise with depth, normalised to sum to 1.

    Args:
        schedule: `"linear"` (weight ∝ layer), `"quadratic"` (∝ layer²), `"uniform"`,
            or comma-separated explicit weights, one per exit.
        exit_layers: the model's exit layers (1-based, ascending, last = final).
        num_layers: model depth.

    Returns:
        float32 array with one weight per exit.
    """
    layers = np.asarray(exit_layers, dtype="float64") / num_layers
    if schedule == "linear":
        weights = layers
    elif schedule == "quadratic":
        weights = layers**2
    elif schedule == "uniform":
        weights = np.ones_like(layers)
    else:
        try:
            weights = np.asarray([float(w) for w in schedule.split(",")], dtype="float64")
        except ValueError:
            raise ValueError(
                f"exit_loss_weights must be one of {EXIT_WEIGHT_SCHEDULES} or comma-separated "
                f"floats; got {schedule!r}."
            ) from None
        if len(weights) != len(layers):
            raise ValueError(
                f"exit_loss_weights gives {len(weights)} weights but the model has "
                f"{len(layers)} exits (layers {list(exit_layers)})."
            )
        if (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"exit_loss_weights must be >= 0 with a positive sum; got {schedule}.")
    return (weights / weights.sum()).astype("float32")


class EarlyExitTrainer(MultiWorkerFit, keras.Model):
    """Wraps an early-exit model for `fit` with the joint exit loss.

    `loss = sum_e w_e * CE(exit_e) + distill_weight * mean_e KL(final || exit_e) * T^2
    + router losses`. The distillation target is the final exit with its gradient
    stopped, so early exits learn to imitate the full model rather than pull it down
    (LayerSkip, CALM). The wrapper is never saved: save `trainer.model`. It trains under
    any `tf.distribute` strategy, multi-worker included (`MultiWorkerFit`).

    Args:
        model: a model whose output dict has `"exit_logits"`, a list ending at the final
            layer (for example `EarlyExitGPT`).
        exit_weights: one weight per exit (see `exit_loss_weights`).
        distill_weight: float >= 0. Defaults to `0.0`.
        distill_temperature: float > 0. Defaults to `1.0`.
    """

    def __init__(self, model, exit_weights, distill_weight=0.0, distill_temperature=1.0, **kw):
        super().__init__(**kw)
        if len(exit_weights) != len(model.exit_layers):
            raise ValueError(
                f"{len(exit_weights)} exit weights for {len(model.exit_layers)} exits."
            )
        if distill_weight < 0 or distill_temperature <= 0:
            raise ValueError(
                "distill_weight must be >= 0 and distill_temperature > 0; got "
                f"{distill_weight} and {distill_temperature}."
            )
        self.model = model
        self.exit_weights = [float(w) for w in exit_weights]
        self.distill_weight = float(distill_weight)
        self.distill_temperature = float(distill_temperature)
        self.exit_loss_trackers = [
            keras.metrics.Mean(name=f"ce_exit_{layer}") for layer in model.exit_layers
        ]

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        y_pred = y_pred["exit_logits"]
        final = ops.cast(y_pred[-1], "float32")
        total = 0.0
        for weight, logits, tracker in zip(self.exit_weights, y_pred, self.exit_loss_trackers):
            # Float32 island: cross-entropy over a large vocabulary in bf16 is lossy.
            cross_entropy = _weighted_mean(
                keras.losses.sparse_categorical_crossentropy(
                    y, ops.cast(logits, "float32"), from_logits=True
                ),
                sample_weight,
            )
            tracker.update_state(cross_entropy)
            total = total + weight * cross_entropy
        if self.distill_weight > 0 and len(y_pred) > 1:
            temperature = self.distill_temperature
            teacher = ops.stop_gradient(ops.log_softmax(final / temperature, axis=-1))
            teacher_probs = ops.exp(teacher)
            distill = 0.0
            for logits in y_pred[:-1]:
                student = ops.log_softmax(ops.cast(logits, "float32") / temperature, axis=-1)
                divergence = ops.sum(teacher_probs * (teacher - student), -1)
                distill = distill + _weighted_mean(divergence, sample_weight)
            total = total + self.distill_weight * temperature**2 * distill / (len(y_pred) - 1)
        if self.losses:
            total = total + ops.sum(ops.stack([ops.cast(v, "float32") for v in self.losses]))
        # Gradients are summed over replicas: each replica's share is 1/replicas.
        return scale_loss_for_replicas(total)

    @property
    def metrics(self):
        return super().metrics + self.exit_loss_trackers


def _weighted_mean(values, sample_weight=None):
    """Mean of per-token `values`, weighted by `sample_weight` when given."""
    if sample_weight is None:
        return ops.mean(values)
    weights = ops.cast(sample_weight, "float32")
    return ops.sum(values * weights) / ops.maximum(ops.sum(weights), 1.0)
