"""Training the learned exit gates (CALM's learned classifier) on a frozen model.

For every token of every window, each gated exit gets a feature, its normed hidden
state (the `exit_normed` output, what the gate reads at decode time), and a label: 1 when
the exit's top-1 token equals the final layer's top-1 (CALM's *consistency* target,
which needs no reference text). The model runs once, without gradient, to collect both;
each gate is then fitted with binary cross-entropy on its own features. The rest of the
model is never in a trainer, so its weights cannot change.

The features of all windows are held in memory: `windows * seq_len * hidden * 4` bytes
per gated exit.
"""

import keras
import numpy as np
from keras import ops

from toex_tf.inference.criteria import passes


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC from the rank statistic (Mann-Whitney U), ties counted half.

    Returns NaN when `labels` holds a single class.
    """
    scores = np.asarray(scores, dtype="float64").reshape(-1)
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_ranks = ends - (counts - 1) / 2.0  # 1-based average rank of each tied group
    rank_sum = average_ranks[inverse][labels].sum()
    return float((rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives))


def gated_exit_layers(model) -> tuple[int, ...]:
    """1-based layers whose block carries a `LearnedExitGate`."""
    return tuple(i + 1 for i, b in enumerate(model.blocks) if b.learned_gate is not None)


def exit_features_and_labels(model, inputs, batch_size: int = 16) -> dict:
    """Each gated exit's normed hidden states and consistency labels over `inputs`.

    Args:
        model: an `EarlyExitGPT` with learned gates.
        inputs: int array `(windows, seq_len)` of token ids.
        batch_size: int, windows per forward pass. Defaults to `16`.

    Returns:
        dict layer → `(features float32 (tokens, hidden), labels bool (tokens,))`.
    """
    layers = gated_exit_layers(model)
    if not layers:
        raise ValueError(
            f"model {model.name!r} has no learned gates; add them with "
            "toex_tf.models.add_learned_gates first."
        )
    inputs = np.asarray(inputs)
    if inputs.ndim != 2 or len(inputs) == 0 or not np.issubdtype(inputs.dtype, np.integer):
        raise ValueError(
            f"inputs must be a non-empty 2-D int array of token ids; got {inputs.dtype} "
            f"{inputs.shape}."
        )
    # A view on the model's own graph: each block's first output is its hidden state,
    # its second the exit's full logits.
    outputs = {"final": ops.argmax(model.blocks[-1].output[1], axis=-1)}
    for layer in layers:
        hidden, logits = model.blocks[layer - 1].output[:2]
        outputs[f"hidden_{layer}"] = hidden
        outputs[f"top1_{layer}"] = ops.argmax(logits, axis=-1)
    feature_model = keras.Model(model.input, outputs)
    collected = feature_model.predict(inputs.astype("int32"), batch_size=batch_size, verbose=0)
    final = collected["final"].reshape(-1)
    data = {}
    for layer in layers:
        exit_normed = model.blocks[layer - 1].exit_normed
        hidden = collected[f"hidden_{layer}"]
        features = np.concatenate(
            [
                ops.convert_to_numpy(ops.cast(exit_normed(hidden[i : i + batch_size]), "float32"))
                for i in range(0, len(hidden), batch_size)
            ]
        )
        labels = collected[f"top1_{layer}"].reshape(-1) == final
        data[layer] = (features.reshape(final.size, -1), labels)
    return data


class _GateLogit(keras.Model):
    """The gate's logit `(tokens, 1)`, so that `fit` trains the gate and nothing else."""

    def __init__(self, gate, **kwargs):
        super().__init__(**kwargs)
        self.gate = gate

    def call(self, features):
        return self.gate.logit(features)[:, None]


def fit_gate(
    gate,
    features: np.ndarray,
    labels: np.ndarray,
    epochs: int = 5,
    batch_size: int = 1024,
    learning_rate: float = 1e-2,
    pos_weight: float | str = 1.0,
) -> list[float]:
    """Fits one `LearnedExitGate` with binary cross-entropy; returns the loss per epoch.

    Args:
        gate: a built `LearnedExitGate`.
        features: float `(tokens, hidden)`.
        labels: bool `(tokens,)`, 1 where the exit agrees with the final layer.
        epochs, batch_size (tokens), learning_rate (Adam): training settings.
        pos_weight: float weight of the positive tokens' loss, or `"balanced"`
            (negatives / positives, so both classes weigh the same). The default `1.0`
            keeps the confidence a calibrated P(consistent); balancing trades that for
            sensitivity to the rarer class.
    """
    labels = np.asarray(labels, dtype="float32").reshape(-1, 1)
    if pos_weight == "balanced":
        positives = float(labels.sum())
        pos_weight = (labels.size - positives) / positives if positives else 1.0
    elif (
        isinstance(pos_weight, bool) or not isinstance(pos_weight, (int, float)) or pos_weight <= 0
    ):
        raise ValueError(f"pos_weight must be a float > 0 or 'balanced'; got {pos_weight!r}.")
    sample_weight = np.where(labels[:, 0] > 0, float(pos_weight), 1.0).astype("float32")
    was_trainable = gate.trainable
    gate.trainable = True  # a frozen model (model.trainable = False) froze its gates too
    try:
        trainer = _GateLogit(gate, name="gate_trainer")
        trainer.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
        )
        history = trainer.fit(
            np.asarray(features, dtype="float32"),
            labels,
            sample_weight=sample_weight,
            epochs=epochs,
            batch_size=batch_size,
            shuffle=True,
            verbose=0,
        )
    finally:
        gate.trainable = was_trainable
    return [float(loss) for loss in history.history["loss"]]


def gate_metrics(gate, features: np.ndarray, labels: np.ndarray) -> dict:
    """Positive rate, accuracy at confidence 0.5, AUC and token count of one gate."""
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    confidence = ops.convert_to_numpy(gate(np.asarray(features, dtype="float32")))
    return {
        "positive_rate": float(labels.mean()),
        "accuracy": float((passes(confidence, 0.5) == labels).mean()),
        "auc": binary_auc(confidence, labels),
        "tokens": int(labels.size),
    }


def fit_learned_gates(
    model,
    inputs,
    epochs: int = 5,
    batch_size: int = 16,
    learning_rate: float = 1e-2,
    pos_weight: float | str = 1.0,
    validation_inputs=None,
) -> dict:
    """Trains every `LearnedExitGate` of `model` in place; the rest of the model is frozen.

    Args:
        model: an `EarlyExitGPT` with learned gates (see `add_learned_gates`).
        inputs: int array `(windows, seq_len)`, the training windows.
        epochs: int. Defaults to `5`.
        batch_size: int, windows per step (the gate sees `batch_size * seq_len` tokens a
            step). Defaults to `16`.
        learning_rate: float, Adam's. Defaults to `1e-2`.
        pos_weight: float or `"balanced"`; see `fit_gate`. Defaults to `1.0`.
        validation_inputs: optional int array of held-out windows.

    Returns:
        dict with `exit_layers` (the gated layers), `train` (and `validation` when given):
        layer → `positive_rate`, `accuracy`, `auc`, `tokens`; and `loss`: layer → the
        training loss per epoch.

    Example:
    >>> gated = add_learned_gates(model)
    >>> report = fit_learned_gates(gated, train_windows, validation_inputs=valid_windows)
    >>> report["validation"][2]["auc"]

    References:
        Schuster et al., "Confident Adaptive Language Modeling" (CALM), 2022.
    """
    data = exit_features_and_labels(model, inputs, batch_size)
    seq_len = np.asarray(inputs).shape[1]
    report = {"exit_layers": list(data), "loss": {}, "train": {}}
    for layer, (features, labels) in data.items():
        gate = model.blocks[layer - 1].learned_gate
        report["loss"][layer] = fit_gate(
            gate, features, labels, epochs, batch_size * seq_len, learning_rate, pos_weight
        )
        report["train"][layer] = gate_metrics(gate, features, labels)
    if validation_inputs is not None:
        held_out = exit_features_and_labels(model, validation_inputs, batch_size)
        report["validation"] = {
            layer: gate_metrics(model.blocks[layer - 1].learned_gate, features, labels)
            for layer, (features, labels) in held_out.items()
        }
    return report
