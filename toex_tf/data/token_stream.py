"""Token streams as NumPy arrays: encoding, frequencies and language-model windows.

Pure NumPy, so statistics (e.g. the shortlist of most frequent tokens) and windowing can be
used without TensorFlow; `toex_tf.data.tf_pipeline` re-exports these functions.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from toex_tf.data.tokenizers import Tokenizer


def encode_documents(documents: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
    """Encodes documents into one stream, each document followed by `tokenizer.eos_id`.

    Args:
        documents: sequence of str. At least one document.
        tokenizer: Tokenizer. Any tokenizer from `toex_tf.data.tokenizers`.

    Returns:
        A 1-D int32 array of ids.

    Raises:
        ValueError: if `documents` is empty.

    Example:
        >>> encode_documents(["hi", "a"], ByteTokenizer()).tolist()
        [104, 105, 256, 97, 256]
    """
    if isinstance(documents, str):
        raise TypeError("documents must be a sequence of str, got a single str.")
    if len(documents) == 0:
        raise ValueError("documents must hold at least one document, got 0.")
    eos = [tokenizer.eos_id]
    encoded = tokenizer.encode_batch(list(documents))
    return np.concatenate([np.asarray(ids + eos, dtype=np.int32) for ids in encoded])


def token_frequencies(token_stream: np.ndarray, vocab_size: int) -> np.ndarray:
    """Counts how often each id occurs in `token_stream`.

    Args:
        token_stream: 1-D int array. Ids in `[0, vocab_size)`.
        vocab_size: int. Length of the result.

    Returns:
        An int64 array of shape `(vocab_size,)`; entry `i` counts id `i`.

    Raises:
        ValueError: if `token_stream` is not 1-D or holds an id outside `[0, vocab_size)`.

    Example:
        >>> token_frequencies(np.array([0, 2, 2]), 4).tolist()
        [1, 0, 2, 0]
    """
    token_stream = np.asarray(token_stream)
    if token_stream.ndim != 1:
        raise ValueError(f"token_stream must be 1-D, got shape {token_stream.shape}.")
    if token_stream.size and (token_stream.min() < 0 or token_stream.max() >= vocab_size):
        raise ValueError(
            f"token_stream holds ids in [{token_stream.min()}, {token_stream.max()}]; expected "
            f"ids in [0, {vocab_size}) for vocab_size {vocab_size}."
        )
    return np.bincount(token_stream, minlength=vocab_size).astype(np.int64)


def lm_windows(token_stream: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Cuts a stream into next-token-prediction windows.

    Window `i` reads `token_stream[i * seq_len : (i + 1) * seq_len + 1]`: its first
    `seq_len` ids are the inputs and its last `seq_len` the targets. Inputs of consecutive
    windows do not overlap, so every token after the first is a target exactly once
    (the stride is `seq_len`, as in nanoGPT); a tail shorter than a window is dropped.

    Args:
        token_stream: 1-D int array.
        seq_len: int. Positive window length.

    Returns:
        `(inputs, targets)`, int32 arrays of shape `(num_windows, seq_len)` with
        `num_windows = (len(token_stream) - 1) // seq_len` and
        `targets[:, :-1] == inputs[:, 1:]`.

    Raises:
        ValueError: if `seq_len` is not positive or the stream is shorter than
            `seq_len + 1`.

    Example:
        >>> inputs, targets = lm_windows(np.arange(7), 3)
        >>> inputs.tolist(), targets.tolist()
        ([[0, 1, 2], [3, 4, 5]], [[1, 2, 3], [4, 5, 6]])
    """
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}.")
    token_stream = np.asarray(token_stream)
    if token_stream.ndim != 1:
        raise ValueError(f"token_stream must be 1-D, got shape {token_stream.shape}.")
    if len(token_stream) < seq_len + 1:
        raise ValueError(
            f"token_stream has {len(token_stream)} tokens; expected at least seq_len + 1 = "
            f"{seq_len + 1} to make one window."
        )
    num_windows = (len(token_stream) - 1) // seq_len
    used = token_stream[: num_windows * seq_len + 1].astype(np.int32)
    inputs = used[:-1].reshape(num_windows, seq_len)
    targets = used[1:].reshape(num_windows, seq_len)
    return inputs, targets
