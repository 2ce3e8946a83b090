"""One training phase of a `HierarchicalLlama`, end to end: train, calibrate the routers'
decode thresholds, set the shortlist, save (and export the base as a HF checkpoint)."""

import os

from toex_tf.calibration.routers import calibrate_routers
from toex_tf.loaders import export_llama
from toex_tf.models.saving import save_model_atomically
from toex_tf.progress import fit_progress
from toex_tf.training.llama_training import train_phase
from toex_tf.training.multi_worker import is_chief


def run_phase(
    model,
    phase: str,
    data,
    output_dir: str,
    steps: int,
    batch_size: int,
    learning_rate: float,
    capacity_start: float | None = 0.9,
    max_windows: int | None = None,
    seed: int = 0,
    checkpoint_every: int = 100,
    verbose: int | str = "auto",
    callbacks=(),
    strategy=None,
    **loss_weights,
) -> dict:
    """Trains one phase of `model` and saves `output_dir/model.keras` (and, after the
    `base` phase, a Hugging Face checkpoint in `output_dir/hf` with the tokenizer).

    Training checkpoints go to `output_dir/checkpoints/PHASE` and TensorBoard logs to
    `output_dir/tensorboard/PHASE`; rerunning the same phase into the same `output_dir`
    resumes from its latest checkpoint (`train_phase`).

    Args:
        model: a `HierarchicalLlama`.
        phase: `base`, `routers`, `exits` or `full` (`train_phase`).
        data: `toex_tf.data.prepared.PreparedData` (windows, tokenizer, token counts). Of a
            streamed corpus, the phase trains on the whole stream (`data.train_dataset`),
            unless `max_windows` asks for a head.
        output_dir: str, where the model, checkpoints and TensorBoard logs go.
        steps, batch_size, learning_rate, capacity_start, seed: `train_phase`'s.
        max_windows: int or None, the training windows used (None: all).
        checkpoint_every: int, steps between checkpoints. Defaults to `100`.
        verbose: `fit` verbosity; `"auto"` (the default): `toex_tf.progress.fit_progress`
            (Keras's bar on a terminal, a line every 30 s in a log, nothing when quiet).
        callbacks: extra Keras callbacks, passed to every `fit`.
        strategy: a `tf.distribute.Strategy` or None (`train_phase`'s). Under a
            multi-worker strategy only the chief saves the model and the HF checkpoint.
        **loss_weights: `LlamaPhaseTrainer` loss weights.

    Returns:
        The phase's logs (`train_phase`).
    """
    inputs, targets = data.train_inputs, data.train_targets
    if max_windows:
        inputs, targets = inputs[:max_windows], targets[:max_windows]
    make_dataset = None
    stream = getattr(data, "train_dataset", None)
    if stream is not None and not max_windows:  # a streamed corpus: all of it

        def make_dataset(skip_batches):
            return stream(batch_size, seed, skip_batches)

    if verbose == "auto":
        verbose, progress = fit_progress(steps, f"phase {phase}")
        callbacks = [*progress, *callbacks]
    logs = train_phase(
        model,
        inputs,
        targets,
        phase,
        steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        capacity_start=capacity_start,
        seed=seed,
        verbose=verbose,
        output_dir=output_dir,
        checkpoint_every=checkpoint_every,
        callbacks=callbacks,
        strategy=strategy,
        make_dataset=make_dataset,
        **loss_weights,
    )
    if model.routers:
        # Decode-time thresholds: the trained capacity's share of training tokens routes.
        calibrate_routers(model, inputs[:64], None)
    if model.config.output_embedding_mode == "shortlist":
        model.token_embedding.set_shortlist_from_counts(data.token_counts)
    if not is_chief():  # every worker holds the same weights; the chief writes them
        return logs
    os.makedirs(output_dir, exist_ok=True)
    save_model_atomically(model, os.path.join(output_dir, "model.keras"))
    if phase == "base":
        hf_dir = export_llama(model, os.path.join(output_dir, "hf"))
        data.tokenizer.save(os.path.join(hf_dir, "toex_tokenizer"))
        model_file = getattr(data.tokenizer, "model_file", None)
        if model_file:  # a SentencePiece model: where load_llama looks for it
            with (
                open(model_file, "rb") as src,
                open(os.path.join(hf_dir, "tokenizer.model"), "wb") as dst,
            ):
                dst.write(src.read())
    return logs
