"""Exit heads trained on a frozen pretrained base from cached hidden states (EE-Tuning).

The base runs once over the training windows (`cache_exit_states`): each non-final
exit's input hidden state, the final layer's normed state and the next-token targets
are kept as float32 arrays. Each exit's trainable parts (its `ExitAdapter` and exit
norm) then learn from those arrays alone (`train_exit_heads`), so a step costs the exit
head, not the 30 layers below it:

    loss = distill_weight * KL(p_final || p_exit) + lm_weight * CE(target, p_exit)

with `p_final` the frozen model's own full-depth distribution (its final norm and head
applied to the cached state) and the head shared and frozen. Memory: `tokens * hidden
* 4` bytes per exit plus the final state.

References: Pan et al., "EE-Tuning: An Economical yet Scalable Solution for Tuning
Early-Exit Large Language Models", 2024.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
from keras import ops


@dataclasses.dataclass
class ExitStates:
    """Cached states of a frozen base over some windows, flattened to tokens.

    `hidden[layer]`: `(tokens, hidden)` block outputs at each non-final exit layer
    (what the exit adapter reads); `final`: `(tokens, hidden)` the final normed state;
    `targets`: `(tokens,)` next-token ids.
    """

    hidden: dict
    final: np.ndarray
    targets: np.ndarray

    @property
    def num_tokens(self) -> int:
        return int(self.targets.shape[0])


def non_final_exit_layers(model) -> tuple[int, ...]:
    """The model's exit layers below the last one (1-based)."""
    return tuple(layer for layer in model.exit_layers if layer < model.num_layers)


def cache_exit_states(model, inputs, targets, batch_size: int = 8) -> ExitStates:
    """Runs the frozen `model` once over `inputs` and keeps what exit training reads.

    Args:
        model: an `AdaptiveModel` with exits.
        inputs: int `(windows, seq_len)`.
        targets: int `(windows, seq_len)`, the next tokens.
        batch_size: windows per forward pass.

    Returns:
        `ExitStates`.
    """
    inputs = np.asarray(inputs, "int32")
    targets = np.asarray(targets)
    if inputs.ndim != 2 or inputs.shape != targets.shape:
        raise ValueError(
            f"inputs and targets must both be (windows, seq_len); got {inputs.shape} and "
            f"{targets.shape}."
        )
    layers = non_final_exit_layers(model)
    if not layers:
        raise ValueError(f"model {model.name!r} has no exit below its last layer.")
    hidden = {layer: [] for layer in layers}
    final = []
    last = model.blocks[-1]
    for start in range(0, len(inputs), batch_size):
        state = model.embed_tokens(inputs[start : start + batch_size])
        for index, block in enumerate(model.blocks, start=1):
            state = block.block(state)
            if index in hidden:
                hidden[index].append(_flat(state))
        final.append(_flat(last.exit_norm(state)))
    return ExitStates(
        hidden={layer: np.concatenate(parts) for layer, parts in hidden.items()},
        final=np.concatenate(final),
        targets=targets.reshape(-1).astype("int32"),
    )


def _flat(tensor) -> np.ndarray:
    array = ops.convert_to_numpy(ops.cast(tensor, "float32"))
    return array.reshape(-1, array.shape[-1])


class ExitHeadTrainer(keras.Model):
    """Trains one exit's adapter and norm on cached states (`fit` on `(hidden, final)`
    pairs with next-token targets). Never saved: the block's layers are the model's."""

    def __init__(self, block, distill_weight: float = 1.0, lm_weight: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("distill_weight", distill_weight), ("lm_weight", lm_weight)):
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0; got {value}.")
        self.block = block
        self.distill_weight = float(distill_weight)
        self.lm_weight = float(lm_weight)

    def call(self, inputs):
        hidden, final = inputs
        student = self.block.exit_logits(hidden)
        teacher = self.block.output_embedding(final, mode="logits")
        return ops.cast(student, "float32"), ops.stop_gradient(ops.cast(teacher, "float32"))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        student, teacher = y_pred
        log_student = ops.log_softmax(student, axis=-1)
        log_teacher = ops.log_softmax(teacher, axis=-1)
        kl = ops.sum(ops.exp(log_teacher) * (log_teacher - log_student), axis=-1)
        targets = ops.cast(y, "int32")
        ce = -ops.take_along_axis(log_student, targets[:, None], axis=-1)[:, 0]
        return ops.mean(self.distill_weight * kl + self.lm_weight * ce)


def train_exit_heads(
    model,
    states: ExitStates,
    steps: int,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    distill_weight: float = 1.0,
    lm_weight: float = 1.0,
    seed: int = 0,
    verbose: int | str = 0,
) -> dict:
    """Trains each non-final exit's adapter and norm on `states` (module docstring).

    Only the exits' `exit_adapter` and `exit_norm` train; the head (shared with the
    final layer) and the base stay as they are.

    Returns:
        `{layer: final training loss}`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}.")
    if not batch_size >= 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}.")
    losses = {}
    rng = np.random.default_rng(seed)
    for layer, hidden in states.hidden.items():
        block = model.blocks[layer - 1]
        trainer = ExitHeadTrainer(block, distill_weight, lm_weight)
        trainable = [block.exit_norm] + ([block.exit_adapter] if block.exit_adapter else [])
        saved = {id(layer_): layer_.trainable for layer_ in (block.output_embedding, *trainable)}
        block.output_embedding.trainable = False
        for part in trainable:
            part.trainable = True
        try:
            order = rng.integers(0, states.num_tokens, steps * batch_size)
            trainer.compile(optimizer=keras.optimizers.Adam(learning_rate))
            history = trainer.fit(
                (hidden[order], states.final[order]),
                states.targets[order],
                batch_size=batch_size,
                epochs=1,
                shuffle=False,
                verbose=verbose,
            )
        finally:
            block.output_embedding.trainable = saved[id(block.output_embedding)]
            for part in trainable:
                part.trainable = saved[id(part)]
        losses[layer] = float(history.history["loss"][-1])
    return losses


def evaluate_exit_heads(model, states: ExitStates, batch_size: int = 512) -> dict:
    """Teacher-forced quality of each non-final exit on `states` (held-out windows).

    Returns:
        `{"full": {"perplexity"}, layer: {"perplexity", "perplexity_increase",
        "top1_agreement", "kl_to_final"}}`: the increase is relative to full depth, the
        KL is `KL(p_final || p_exit)` in nats per token (what distillation minimises).
    """
    head = model.blocks[-1].output_embedding
    targets = states.targets
    rows = np.arange(batch_size)
    totals = {layer: np.zeros(3) for layer in states.hidden}  # nll, agreement, kl
    final_nll = 0.0
    for start in range(0, len(targets), batch_size):
        stop = min(start + batch_size, len(targets))
        picked = rows[: stop - start], targets[start:stop]
        teacher = _log_softmax(head(states.final[start:stop], mode="logits"))
        final_nll += -teacher[picked].sum()
        teacher_top1 = teacher.argmax(-1)
        for layer, hidden in states.hidden.items():
            student = _log_softmax(model.blocks[layer - 1].exit_logits(hidden[start:stop]))
            totals[layer] += (
                -student[picked].sum(),
                (student.argmax(-1) == teacher_top1).sum(),
                (np.exp(teacher) * (teacher - student)).sum(),
            )
    full = float(np.exp(final_nll / len(targets)))
    report = {"full": {"perplexity": full}}
    for layer, (nll, agreement, kl) in totals.items():
        perplexity = float(np.exp(nll / len(targets)))
        report[layer] = {
            "perplexity": perplexity,
            "perplexity_increase": perplexity / full - 1.0,
            "top1_agreement": float(agreement / len(targets)),
            "kl_to_final": float(kl / len(targets)),
        }
    return report


def _log_softmax(logits) -> np.ndarray:
    logits = ops.convert_to_numpy(ops.cast(logits, "float32")).astype("float64")
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def gate_features(model, states: ExitStates, batch_size: int = 512) -> dict:
    """Each exit's gate features and consistency labels from cached states.

    The features are what the gate reads at decode time (`exit_normed`); the label is 1
    where the exit's top-1 token equals the final layer's (CALM's consistency target).

    Returns:
        `{layer: (features float32 (tokens, hidden), labels bool (tokens,))}`.
    """
    head = model.blocks[-1].output_embedding
    final_top1 = np.concatenate(
        [
            ops.convert_to_numpy(
                ops.argmax(head(states.final[i : i + batch_size], mode="logits"), axis=-1)
            )
            for i in range(0, states.num_tokens, batch_size)
        ]
    )
    data = {}
    for layer, hidden in states.hidden.items():
        block = model.blocks[layer - 1]
        features, top1 = [], []
        for i in range(0, states.num_tokens, batch_size):
            normed = block.exit_normed(hidden[i : i + batch_size])
            features.append(ops.convert_to_numpy(ops.cast(normed, "float32")))
            top1.append(ops.convert_to_numpy(ops.argmax(head(normed, mode="logits"), axis=-1)))
        data[layer] = (np.concatenate(features), np.concatenate(top1) == final_top1)
    return data


def fit_gates_on_states(
    model, states: ExitStates, validation: ExitStates | None = None, epochs: int = 5
) -> dict:
    """Fits each exit's `LearnedExitGate` on cached states (after the heads are trained:
    the labels depend on them). Returns `fit_learned_gates`' report."""
    from toex_tf.training.gate_training import fit_gate, gate_metrics  # noqa: PLC0415

    data = gate_features(model, states)
    report = {"exit_layers": list(data), "loss": {}, "train": {}}
    for layer, (features, labels) in data.items():
        gate = model.blocks[layer - 1].learned_gate
        if gate is None:
            raise ValueError(f"exit {layer} has no learned gate to fit.")
        report["loss"][layer] = fit_gate(gate, features, labels, epochs)
        report["train"][layer] = gate_metrics(gate, features, labels)
    if validation is not None:
        report["validation"] = {
            layer: gate_metrics(model.blocks[layer - 1].learned_gate, features, labels)
            for layer, (features, labels) in gate_features(model, validation).items()
        }
    return report
