"""TensorFlow input pipeline: `tf.data` batches of language-model windows.

The NumPy helpers (`encode_documents`, `token_frequencies`, `lm_windows`) live in
`toex_tf.data.token_stream` and are re-exported here so that a training script can import
the whole pipeline from one module.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from toex_tf.data.streaming import TokenShards
from toex_tf.data.token_stream import encode_documents, lm_windows, token_frequencies

__all__ = [
    "encode_documents",
    "lm_windows",
    "make_lm_dataset",
    "make_shard_dataset",
    "token_frequencies",
]


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
    _check_batches(len(inputs), batch_size, repeat, drop_remainder, skip_batches)

    return make_indexed_dataset(
        (inputs.astype("int32"), targets.astype("int32")),
        batch_size,
        shuffle,
        seed,
        repeat,
        drop_remainder,
        skip_batches,
    )


def _check_batches(num_windows, batch_size, repeat, drop_remainder, skip_batches) -> None:
    """Raises when the windows do not fill a batch, or `skip_batches` passes the end."""
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


def make_shard_dataset(
    shards: TokenShards,
    seq_len: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    repeat: bool,
    skip_batches: int = 0,
    cycle_length: int = 8,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """Batches LM windows read from token shards on disk, exactly reproducibly.

    The windows are `lm_windows(stream, seq_len)` of the split's whole stream (the same
    windows as in memory; one at a shard boundary reads two files), and each belongs to
    the shard holding its first id. Epoch `e`:

    1. orders the shards by `stateless_shuffle(range(num_shards), seed=[seed, e])`;
    2. takes them `cycle_length` at a time and permutes each such group's windows together
       (`stateless_shuffle`, seed `[seed, e]` folded with the group): the files are
       interleaved, and the shuffle buffer is the group, at most `cycle_length *
       shard_tokens / seq_len` window indices (8 bytes each; 2 MB with the default 8 M-id
       shards at seq_len 256), whatever the corpus size;
    3. batches the window indices and only then reads each batch's windows
       (`TokenShards.read_windows`: one `os.pread` of `seq_len + 1` ids per window).

    The batch sequence is a pure function of `(seed, shards)`: no global seed, no state
    carried between iterations or processes. Skipping is arithmetic: `skip_batches` whole
    epochs and groups are never built, and the first group is sliced, so resuming at any
    step costs one group's permutation.

    Args:
        shards: `toex_tf.data.streaming.TokenShards`, e.g. `PreparedData.shards`' train.
        seq_len: int, the window length.
        batch_size, shuffle, seed, repeat, drop_remainder, skip_batches: as in
            `make_lm_dataset` (`shuffle=False` reads the windows in stream order).
        cycle_length: int, shards mixed at once. Defaults to 8.

    Returns:
        A dataset of `(inputs, targets)` int32 batches of shape `(batch_size, seq_len)`.

    Raises:
        ValueError: if an argument is out of range or the windows do not fill a batch.

    Example:
        >>> corpus = build_token_shards(open_document_stream("text:c/*.txt"), tok, "cache")
        >>> dataset = make_shard_dataset(corpus.splits["train"], 256, 32, True, 0, True)
    """
    for name, value in (
        ("seq_len", seq_len),
        ("batch_size", batch_size),
        ("cycle_length", cycle_length),
    ):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if not isinstance(skip_batches, (int, np.integer)) or skip_batches < 0:
        raise ValueError(f"skip_batches must be an int >= 0, got {skip_batches!r}.")
    first, count = shards.shard_windows(seq_len)
    num_windows, num_shards = int(count.sum()), len(count)
    _check_batches(num_windows, batch_size, repeat, drop_remainder, skip_batches)
    num_groups = -(-num_shards // cycle_length)
    seed_tensor = tf.constant(seed, tf.int64)
    starts, ends = tf.constant(first), tf.constant(first + count)

    def shard_order(epoch):
        order = tf.range(num_shards, dtype=tf.int64)
        if not shuffle:
            return order
        return tf.random.experimental.stateless_shuffle(order, tf.stack([seed_tensor, epoch]))

    def group_windows(epoch, group):
        members = shard_order(epoch)[group * cycle_length : (group + 1) * cycle_length]
        windows = tf.ragged.range(tf.gather(starts, members), tf.gather(ends, members)).flat_values
        if shuffle:
            group_seed = tf.random.experimental.stateless_fold_in(
                tf.stack([seed_tensor, epoch]), group
            )
            windows = tf.random.experimental.stateless_shuffle(windows, group_seed)
        return windows

    # Where batch `skip_batches` starts: epoch, group of that epoch, window in the group.
    start_epoch, start = divmod(skip_batches * batch_size, num_windows)
    order = shard_order(tf.constant(start_epoch, tf.int64)).numpy()
    sizes = [
        int(count[order[g : g + cycle_length]].sum()) for g in range(0, num_shards, cycle_length)
    ]
    start_group = int(np.searchsorted(np.cumsum(sizes), start, "right"))
    start -= sum(sizes[:start_group])

    epochs = (
        tf.data.Dataset.counter(start_epoch) if repeat else tf.data.Dataset.range(start_epoch, 1)
    )
    groups = epochs.flat_map(
        lambda epoch: tf.data.Dataset.range(num_groups).map(lambda group: (epoch, group))
    )
    windows = (
        groups.skip(start_group)
        .enumerate()
        .flat_map(
            lambda i, pair: tf.data.Dataset.from_tensor_slices(
                group_windows(*pair)[tf.where(i == 0, start, 0) :]
            )
        )
    )
    dataset = windows.batch(batch_size, drop_remainder=drop_remainder or repeat)

    def read(indices):
        tokens = tf.numpy_function(
            lambda i: shards.read_windows(i, seq_len), [indices], tf.int32, stateful=False
        )
        tokens.set_shape([batch_size if drop_remainder or repeat else None, seq_len + 1])
        return tokens[:, :-1], tokens[:, 1:]

    dataset = dataset.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)
