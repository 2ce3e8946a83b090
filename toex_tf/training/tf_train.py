"""Training loop: Keras `fit` with the joint exit loss, checkpoints and exact resume.

TensorFlow only (tf.data, tf.distribute). Resume is exact: the data order is a pure
function of (seed, step), and checkpoints hold the weights, the optimizer state and
the random-generator state, so a run interrupted and resumed ends with the same
weights as one that was not interrupted.
"""

import hashlib
import os

import keras
import numpy as np

from toex_tf.config import GPTConfig, TrainConfig
from toex_tf.data.tf_pipeline import make_lm_dataset
from toex_tf.models.gpt import EarlyExitGPT
from toex_tf.progress import fit_progress
from toex_tf.training.checkpoint import (
    CheckpointEvery,
    CheckpointManager,
    check_output_dir,
    checkpoint_bytes,
)
from toex_tf.training.exit_loss import EarlyExitTrainer, exit_loss_weights
from toex_tf.training.multi_worker import (
    check_same_run,
    share_batches,
    weights_digest,
    write_dir,
)
from toex_tf.training.tensorboard import GlobalStepTensorBoard
from toex_tf.training.tf_distribute import make_strategy


def make_optimizer(config: TrainConfig) -> keras.optimizers.Optimizer:
    """AdamW with linear warm-up then cosine decay to 10% of the peak rate."""
    warmup = min(config.warmup_steps, max(config.steps - 1, 0))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else config.learning_rate,
        decay_steps=max(config.steps - warmup, 1),
        alpha=0.1,
        warmup_target=config.learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule, weight_decay=config.weight_decay, clipnorm=1.0
    )
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "scale"])
    return optimizer


def validate_train_config(config: TrainConfig) -> None:
    for name in ("steps", "batch_size", "seq_len", "checkpoint_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}.")
    if config.learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0; got {config.learning_rate}.")


def train(
    model_config: GPTConfig,
    train_config: TrainConfig,
    inputs: np.ndarray,
    targets: np.ndarray,
    output_dir: str,
    token_counts: np.ndarray | None = None,
    callbacks=(),
    verbose: int | str = "auto",
    initial_model: EarlyExitGPT | None = None,
    train_dataset=None,
) -> EarlyExitGPT:
    """Trains (or resumes training of) an early-exit GPT.

    Args:
        model_config: the model to build.
        train_config: steps, batch, optimiser, exit-loss and checkpoint settings.
        inputs, targets: int32 `(windows, seq_len)` arrays.
        output_dir: checkpoints go to `output_dir/checkpoints`, TensorBoard logs to
            `output_dir/tensorboard`. An existing checkpoint there is resumed.
        token_counts: optional corpus token counts; sets the exit shortlist.
        callbacks: extra Keras callbacks.
        verbose: `fit` verbosity.
        initial_model: None, or a model whose weights training starts from (fine-tuning;
            `model_config` must be its config). A checkpoint in `output_dir` still wins:
            resuming restores it.
        train_dataset: None, or `(batch_size, seed, skip_batches) -> tf.data.Dataset`, a
            streamed corpus's training split (`PreparedData.train_dataset`); training
            then reads it, and `inputs, targets` (a head of it) are only checked.

    Returns:
        The trained model (outside any distribution scope's concerns: weights are
        plain variables that `model.save` can write).
    """
    validate_train_config(train_config)
    if inputs.shape != targets.shape or inputs.ndim != 2:
        raise ValueError(
            f"inputs and targets must be equal 2-D arrays; got {inputs.shape} and {targets.shape}."
        )
    if inputs.shape[1] > model_config.max_length:
        raise ValueError(
            f"seq_len={inputs.shape[1]} exceeds the model's max_length={model_config.max_length}."
        )
    top_id = int(max(inputs.max(), targets.max()))
    if top_id >= model_config.vocab_size or min(inputs.min(), targets.min()) < 0:
        raise ValueError(
            f"token ids must be in [0, vocab_size={model_config.vocab_size}); the data has "
            f"ids up to {top_id}."
        )
    if train_dataset is None and len(inputs) < train_config.batch_size:
        raise ValueError(
            f"only {len(inputs)} training windows for batch_size={train_config.batch_size}: "
            "use more data, a shorter seq_len or a smaller batch."
        )

    def build_model():
        model = EarlyExitGPT(**model_config.to_dict(), seed=train_config.seed)
        if initial_model is not None:
            if initial_model.config != model_config:
                raise ValueError(
                    f"initial_model's config {initial_model.config} differs from model_config "
                    f"{model_config}."
                )
            model.set_weights(initial_model.get_weights())
        if token_counts is not None and model_config.output_embedding_mode == "shortlist":
            model.token_embedding.set_shortlist_from_counts(token_counts)
        return model

    def make_dataset(skip_batches):
        if train_dataset is not None:
            return train_dataset(train_config.batch_size, train_config.seed, skip_batches)
        return make_lm_dataset(
            inputs,
            targets,
            batch_size=train_config.batch_size,
            shuffle=True,
            seed=train_config.seed,
            repeat=True,
            skip_batches=skip_batches,
        )

    # A checkpoint of another model, optimizer setting or corpus is refused by name.
    # More steps are allowed: a finished run can be trained on.
    run_config = {
        "model_config": model_config.to_dict(),
        **{
            name: getattr(train_config, name)
            for name in (
                "batch_size",
                "learning_rate",
                "warmup_steps",
                "weight_decay",
                "exit_loss_weights",
                "distill_weight",
                "distill_temperature",
                "seed",
            )
        },
        "windows": list(inputs.shape),
        "windows_sha256": hashlib.sha256(np.ascontiguousarray(inputs).tobytes()).hexdigest(),
    }
    return fit_exit_model(
        build_model, make_dataset, train_config, output_dir, callbacks, verbose, run_config
    )


def fit_exit_model(
    build_model,
    make_dataset,
    train_config: TrainConfig,
    output_dir: str,
    callbacks=(),
    verbose="auto",
    run_config: dict | None = None,
):
    """Builds a model with exits and trains it with `fit` and the joint exit loss.

    The part every family's training shares: the distribution scope, the
    `EarlyExitTrainer` with the configured exit weights and distillation, the optimizer,
    checkpoints every `checkpoint_every` steps with exact resume, and TensorBoard.

    Args:
        build_model: `() -> keras.Model` with exits, called inside the strategy scope.
        make_dataset: `(skip_batches) -> tf.data.Dataset` of `(inputs, labels)` or
            `(inputs, labels, sample_weights)` batches, repeating, whose order is a pure
            function of the seed (`make_indexed_dataset`), so a resumed run skips exactly
            the batches it already saw.
        train_config: steps, optimizer, exit-loss and checkpoint settings.
        output_dir: checkpoints go to `output_dir/checkpoints`, TensorBoard logs to
            `output_dir/tensorboard`. An existing checkpoint there is resumed. Under a
            multi-worker `train_config.strategy`, only the chief writes there; other
            workers write into temporary directories of their own (`write_dir`).
        callbacks: extra Keras callbacks.
        verbose: `fit` verbosity; `"auto"`: `toex_tf.progress.fit_progress` (Keras's
            bar on a terminal, a line every 30 s in a log, nothing when quiet).
        run_config: dict or None: what a checkpoint must have been written with to be
            resumed (`CheckpointManager`): another run's is refused, naming the setting.

    Returns:
        The trained model.
    """
    keras.utils.set_random_seed(train_config.seed)
    strategy = make_strategy(train_config.strategy)
    with strategy.scope():
        model = build_model()
        weights = exit_loss_weights(
            train_config.exit_loss_weights, model.exit_layers, model.num_layers
        )
        trainer = EarlyExitTrainer(
            model,
            weights,
            distill_weight=train_config.distill_weight,
            distill_temperature=train_config.distill_temperature,
        )
        optimizer = make_optimizer(train_config)
        # XLA compiles for one device: with replicas on several devices it cannot place
        # the mirrored variables, so distributed runs use the plain graph.
        jit_compile = train_config.jit_compile and strategy.num_replicas_in_sync == 1
        trainer.compile(optimizer=optimizer, jit_compile=jit_compile)
        optimizer.build(trainer.trainable_variables)
    # Under a multi-worker strategy only the chief writes into output_dir; every worker
    # resumes from the chief's checkpoints there.
    writes = write_dir(output_dir)
    manager = CheckpointManager(
        os.path.join(output_dir, "checkpoints"),
        run_config=run_config,
        write_directory=os.path.join(writes, "checkpoints"),
    )
    if run_config is not None:  # workers that prepared different data must not train
        check_same_run(strategy, run_config)
    # A read-only or full disk fails now, not at the first checkpoint: room for the kept
    # checkpoints, the one being written and the saved model.
    check_output_dir(
        writes, (manager.max_to_keep + 2) * checkpoint_bytes(model, optimizer), "output_dir"
    )
    step = 0
    if manager.latest() is not None:
        step = manager.restore(model, optimizer)
        print(f"Resumed from {manager.latest()} at step {step}.")
    remaining = train_config.steps - step
    if remaining > 0:
        progress = []
        if verbose == "auto":  # Keras's bar on a terminal, short lines in a log
            verbose, progress = fit_progress(remaining)
        all_callbacks = [
            CheckpointEvery(manager, model, train_config.checkpoint_every, step),
            # Steps run on after a resume (Keras's own would restart at 0).
            GlobalStepTensorBoard(
                os.path.join(writes, "tensorboard"), initial_step=step, update_freq=10
            ),
            *progress,
            *callbacks,
        ]
        history = trainer.fit(
            share_batches(make_dataset(step), strategy),
            epochs=1,
            steps_per_epoch=remaining,
            shuffle=False,  # the dataset is already shuffled, reproducibly
            callbacks=all_callbacks,
            verbose=verbose,
        )
        # Comparable across runs and workers: the loss over the last fit's steps and
        # the weights' digest (every worker of a multi-worker run prints the same).
        print(
            f"Trained to step {train_config.steps}: loss {history.history['loss'][-1]:.6f}, "
            f"weights sha256 {weights_digest(model)}."
        )
    model.token_embedding.refresh_low_rank()
    return model
