"""TensorFlow input pipeline: `tf.data` batches of language-model windows.

The NumPy helpers (`encode_documents`, `token_frequencies`, `lm_windows`) live in
`toex_tf.data.token_stream` and are re-exported here so that a training script can import
the whole pipeline from one module.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from toex_tf.data.token_stream import encode_documents, lm_windows, token_frequencies

__all__ = ["encode_documents", "lm_windows", "make_lm_dataset", "token_frequencies"]


def make_lm_dataset(
    inputs: np.ndarray,
    targets: np.ndarray,
    batch_size: int,
    shuffle: bool,
    seed: int,
    repeat: bool,
    drop_remainder: bool = True,
    skip_batches: int = 0,
) -> tf.data.Dataset:
    """Batches `(inputs, targets)` windows into an exactly reproducible `tf.data.Dataset`.

    Epoch `e` visits the windows in the order `stateless_shuffle(range(n), seed=[seed, e])`.
    Stateless shuffling (rather than `Dataset.shuffle`) makes the batch sequence a pure
    function of `seed`: it does not depend on TensorFlow's global seed, on how many times
    the dataset was iterated before, or on the process, so an interrupted run resumes on
    exactly the batches it would have seen (`skip_batches`). Each epoch is a new
    permutation. Windows are batched as indices and gathered afterwards, so skipping
    batches costs almost nothing.

    Args:
        inputs: int array of shape `(num_windows, seq_len)`, e.g. from `lm_windows`.
        targets: int array with the same shape as `inputs`.
        batch_size: int. Windows per batch (positive).
        shuffle: bool. Whether to permute the windows in each epoch (False keeps their
            order, e.g. for validation).
        seed: int. Shuffle seed.
        repeat: bool. Whether to cycle over the windows forever. When True, batches run
            across epoch boundaries, so no window is ever dropped.
        drop_remainder: bool, defaults to True. Whether to drop the last, smaller batch
            (only matters with `repeat=False`); True keeps the batch shape static.
        skip_batches: int, defaults to 0. Number of batches skipped from the start, to
            resume an interrupted run where it stopped.

    Returns:
        A dataset of `(inputs, targets)` int32 batches of shape `(batch_size, seq_len)`.

    Raises:
        ValueError: if the shapes disagree, `batch_size` or `skip_batches` is out of range,
            or the windows do not fill one batch.

    Example:
        >>> inputs, targets = lm_windows(encode_documents(documents, tokenizer), 128)
        >>> dataset = make_lm_dataset(inputs, targets, 32, shuffle=True, seed=0, repeat=True)
    """
    inputs = np.asarray(inputs)
    targets = np.asarray(targets)
    if inputs.ndim != 2 or inputs.shape != targets.shape:
        raise ValueError(
            f"inputs and targets must both have shape (num_windows, seq_len); got "
            f"{inputs.shape} and {targets.shape}."
        )
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not isinstance(skip_batches, (int, np.integer)) or skip_batches < 0:
        raise ValueError(f"skip_batches must be an int >= 0, got {skip_batches!r}.")
    num_windows = len(inputs)
    batches_per_epoch = (
        num_windows // batch_size if drop_remainder else -(-num_windows // batch_size)
    )
    if batches_per_epoch == 0 or (repeat and num_windows == 0):
        raise ValueError(
            f"batch_size {batch_size} is larger than the {num_windows} windows available "
            "(with drop_remainder=True); expected batch_size <= num_windows."
        )
    if not repeat and skip_batches > batches_per_epoch:
        raise ValueError(
            f"skip_batches {skip_batches} exceeds the {batches_per_epoch} batches of one "
            "epoch (repeat=False); expected skip_batches <= batches per epoch."
        )

    return make_indexed_dataset(
        (inputs.astype("int32"), targets.astype("int32")),
        batch_size,
        shuffle,
        seed,
        repeat,
        drop_remainder,
        skip_batches,
    )


def make_indexed_dataset(
    arrays,
    batch_size: int,
    shuffle: bool,
    seed: int,
    repeat: bool,
    drop_remainder: bool = True,
    skip_batches: int = 0,
) -> tf.data.Dataset:
    """Batches a nested structure of arrays with one shared first axis, reproducibly.

    The order is `make_lm_dataset`'s: epoch `e` visits `stateless_shuffle(range(n),
    seed=[seed, e])`, batched as indices and gathered afterwards, so an interrupted run
    resumes on exactly the batches it would have seen (`skip_batches`). Arguments are
    `make_lm_dataset`'s (checked there); `arrays` is, for example, `(inputs, labels,
    sample_weights)` with `inputs` a dict (a seq2seq batch).
    """
    flat = [np.asarray(array) for array in tf.nest.flatten(arrays)]
    num_windows = len(flat[0])
    if any(len(array) != num_windows for array in flat):
        raise ValueError(
            f"arrays must share their first axis; got lengths {[len(a) for a in flat]}."
        )
    tensors = tf.nest.pack_sequence_as(arrays, [tf.constant(array) for array in flat])
    seed_tensor = tf.constant(seed, dtype=tf.int64)

    def epoch_indices(epoch: tf.Tensor) -> tf.data.Dataset:
        indices = tf.range(num_windows, dtype=tf.int64)
        if shuffle:
            indices = tf.random.experimental.stateless_shuffle(
                indices, seed=tf.stack([seed_tensor, epoch])
            )
        return tf.data.Dataset.from_tensor_slices(indices)

    epochs = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(1)
    dataset = epochs.flat_map(epoch_indices)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder or repeat)
    dataset = dataset.skip(skip_batches)
    dataset = dataset.map(
        lambda indices: tf.nest.map_structure(lambda t: tf.gather(t, indices), tensors)
    )
    return dataset.prefetch(tf.data.AUTOTUNE)
