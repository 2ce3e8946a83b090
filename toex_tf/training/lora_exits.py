"""Light tuning for early exit that leaves the base's weights untouched: LoRA updates on
the upper layers, trained with the exit loss and layer dropout (LayerSkip's recipe,
scaled down to a CPU).

The layers below `first_layer` stay exactly the base's, so their output is computed
once (`cache_lora_inputs`), with the frozen base's final normed state (the teacher).
A step then runs layers `first_layer..L` only. For every exit at or above
`first_layer`, the final layer included:

    loss += distill_weight * KL(p_base || p_exit) + lm_weight * CE(target, p_exit)

with `p_base` the untuned model's full-depth distribution, so the final layer is held
near the base while the exits move towards it. Layer dropout skips layer `l` for a
sequence with probability `layer_dropout * (2 ** ((l - first) / (L - first)) - 1)`, the
exponential-in-depth schedule of LayerSkip (0 at `first_layer`, `layer_dropout` at the
top).

The updates are merged into the kernels afterwards (`HierarchicalLlama.merge_lora`),
so the tuned model decodes exactly as fast as the base.

References:
    Elhoushi et al., "LayerSkip: Enabling Early Exit Inference and Self-Speculative
    Decoding", 2024. Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
    2021.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from toex_tf.training.llama_training import warmup_cosine_adamw


def _check_windows(model, inputs, targets) -> tuple[np.ndarray, np.ndarray]:
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    if inputs.ndim != 2 or inputs.shape != targets.shape or len(inputs) == 0:
        raise ValueError(
            f"inputs and targets must be equal non-empty (windows, seq) arrays; got "
            f"{inputs.shape} and {targets.shape}."
        )
    vocab = model.config.vocab_size
    if min(inputs.min(), targets.min()) < 0 or max(inputs.max(), targets.max()) >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}).")
    return inputs.astype("int32"), targets.astype("int32")


def cache_lora_inputs(model, inputs, first_layer: int, batch_size: int = 8) -> tuple:
    """The frozen model's hidden state entering `first_layer` and its final normed state.

    Returns:
        `(hidden, final)`: float32 `(windows, seq, hidden)` arrays.
    """
    hidden, final = [], []
    for start in range(0, len(inputs), batch_size):
        h = model.embed_tokens(ops.convert_to_tensor(inputs[start : start + batch_size]))
        for index, block in enumerate(model.blocks, start=1):
            if index == first_layer:
                hidden.append(ops.convert_to_numpy(ops.cast(h, "float32")))
            h = block.block(h, routing="all")
        final.append(ops.convert_to_numpy(ops.cast(model.blocks[-1].exit_normed(h), "float32")))
    return np.concatenate(hidden), np.concatenate(final)


def dropout_rates(first_layer: int, num_layers: int, layer_dropout: float) -> list[float]:
    """LayerSkip's per-layer skip probabilities for layers `first_layer..num_layers`."""
    span = max(num_layers - first_layer, 1)
    return [
        layer_dropout * (2.0 ** ((layer - first_layer) / span) - 1.0)
        for layer in range(first_layer, num_layers + 1)
    ]


class LoraExitTrainer(keras.Model):
    """Runs layers `first_layer..L` of `model` on cached inputs with layer dropout and
    returns every exit's logits there, with the base's (module docstring). Never saved.
    """

    def __init__(
        self,
        model,
        first_layer: int,
        layer_dropout: float = 0.1,
        distill_weight: float = 1.0,
        lm_weight: float = 1.0,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.model = model
        self.first_layer = int(first_layer)
        self.rates = dropout_rates(first_layer, model.num_layers, layer_dropout)
        self.distill_weight = float(distill_weight)
        self.lm_weight = float(lm_weight)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        hidden, final = inputs
        h = hidden
        logits = []
        blocks = self.model.blocks[self.first_layer - 1 :]
        for block, rate in zip(blocks, self.rates, strict=True):
            new = block.block(h, training=training, routing="all")
            if training and rate > 0:
                keep = keras.random.uniform((ops.shape(h)[0], 1, 1), seed=self.seed_generator)
                new = ops.where(keep >= rate, new, h)
            h = new
            if block.has_exit:
                logits.append(ops.cast(block.exit_logits(h), "float32"))
        teacher = self.model.blocks[-1].output_embedding(final, mode="logits")
        return logits, ops.stop_gradient(ops.cast(teacher, "float32"))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        logits, teacher = y_pred
        log_teacher = ops.log_softmax(teacher, axis=-1)
        teacher_probs = ops.exp(log_teacher)
        targets = ops.cast(y, "int32")[..., None]
        total = 0.0
        for student in logits:
            log_student = ops.log_softmax(student, axis=-1)
            kl = ops.mean(ops.sum(teacher_probs * (log_teacher - log_student), axis=-1))
            ce = -ops.mean(ops.take_along_axis(log_student, targets, axis=-1))
            total = total + self.distill_weight * kl + self.lm_weight * ce
        return total / len(logits)


def train_lora_exits(
    model,
    inputs,
    targets,
    steps: int,
    rank: int = 8,
    first_layer: int | None = None,
    layer_dropout: float = 0.1,
    batch_size: int = 4,
    learning_rate: float = 1e-4,
    seed: int = 0,
    verbose: int | str = 0,
) -> dict:
    """Enables LoRA on layers `first_layer..L`, trains it with the exit loss and layer
    dropout (module docstring), then merges it into the kernels.

    Args:
        model: a `HierarchicalLlama` with exits (its exit adapters, if any, train too).
        inputs, targets: int `(windows, seq)` next-token windows.
        steps: optimizer steps (AdamW, cosine decay after a 10% warm-up).
        rank: LoRA rank (the issue's budget: at most 16).
        first_layer: the lowest tuned layer (1-based); None: the lowest non-final exit.
        layer_dropout: float in [0, 1), the top layer's skip probability.
        batch_size: windows per step.
        learning_rate: the peak rate.
        seed: shuffling, dropout and LoRA initialisation seed.
        verbose: `fit` verbosity.

    Returns:
        `{"loss": [first logged, last logged], "projections": n, "first_layer": k,
        "dropout_rates": [...]}`.
    """
    inputs, targets = _check_windows(model, inputs, targets)
    exits = [layer for layer in model.exit_layers if layer < model.num_layers]
    if first_layer is None:
        if not exits:
            raise ValueError("the model has no exit below its last layer to tune for.")
        first_layer = exits[0]
    if isinstance(first_layer, bool) or not 1 <= int(first_layer) <= model.num_layers:
        raise ValueError(f"first_layer must be in [1, {model.num_layers}]; got {first_layer!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r}.")
    if not 0.0 <= layer_dropout < 1.0:
        raise ValueError(f"layer_dropout must be in [0, 1); got {layer_dropout!r}.")
    first_layer = int(first_layer)
    hidden, final = cache_lora_inputs(model, inputs, first_layer)
    keras.utils.set_random_seed(seed)
    projections = model.enable_lora(rank, range(first_layer, model.num_layers + 1))
    model.set_phase("lora")
    trainer = LoraExitTrainer(model, first_layer, layer_dropout, seed=seed)
    trainer.compile(optimizer=warmup_cosine_adamw(steps, learning_rate))
    order = np.random.default_rng(seed).integers(0, len(inputs), steps * batch_size)
    try:
        history = trainer.fit(
            (hidden[order], final[order]),
            targets[order],
            batch_size=batch_size,
            epochs=1,
            shuffle=False,
            verbose=verbose,
        )
    finally:
        model.merge_lora()
        model.set_phase("frozen")
    return {
        "loss": float(history.history["loss"][-1]),
        "projections": projections,
        "first_layer": first_layer,
        "dropout_rates": trainer.rates,
    }
