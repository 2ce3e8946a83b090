"""Prompts at the engine's boundary: left padding, and the checks of generation arguments.

Batches of prompts with different lengths are left-padded (`pad_prompts`) and carry a
padding mask: pad slots are masked out of attention at every step, and a row's learned
positions start at its first real token. RoPE needs no shift: it is relative, and every
token of a row is shifted by the same amount.
"""

import numpy as np
from keras import ops

from toex_tf.inference.sampling import SAMPLING


def padding_state(padding_mask, cache_length: int):
    """`(key_mask (batch, cache_length) bool, offsets (batch,) int32)` of a left-padded batch.

    `offsets` is each row's pad count: its first real token sits at column `offsets[b]`
    and has position 0. Columns past the prompt (generated tokens) are never masked.
    """
    mask = ops.cast(padding_mask, "bool")
    batch, prompt_length = ops.shape(mask)[0], ops.shape(mask)[1]
    rest = ops.ones((batch, cache_length - prompt_length), "bool")
    offsets = prompt_length - ops.sum(ops.cast(mask, "int32"), axis=1)
    return ops.concatenate([mask, rest], axis=1), ops.cast(offsets, "int32")


def pad_prompts(prompts, pad_id: int = 0):
    """Left-pads token-id lists of different lengths: `(prompt, padding_mask)` int32 arrays.

    Left padding keeps every row's last prompt token in the last column, so one decode
    position serves the whole batch.
    """
    rows = [list(row) for row in prompts]
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("pad_prompts needs at least one prompt and no empty prompt.")
    length = max(len(row) for row in rows)
    prompt = np.full((len(rows), length), pad_id, "int32")
    mask = np.zeros((len(rows), length), "int32")
    for index, row in enumerate(rows):
        prompt[index, length - len(row) :] = row
        mask[index, length - len(row) :] = 1
    return prompt, mask


def validate_generation(
    adapter, prompt, max_new_tokens, sampling, temperature, top_k, top_p, padding_mask=None
):
    """Checks generation arguments at the boundary; returns the prompt as an array."""
    if isinstance(prompt, (list, tuple)):
        lengths = (
            sorted({len(row) for row in prompt})
            if all(isinstance(row, (list, tuple, np.ndarray)) for row in prompt)
            else []
        )
        if len(lengths) > 1 and padding_mask is None:
            raise ValueError(
                f"prompt rows have different lengths {lengths} and no padding_mask was "
                f"given: left-pad them with toex_tf.inference.pad_prompts(prompts), which "
                f"returns the prompt and its padding_mask."
            )
        prompt = np.asarray(prompt)
    shape = tuple(prompt.shape)
    if len(shape) != 2:
        raise ValueError(f"prompt must be (batch, length) token ids; got shape {shape}.")
    if shape[1] == 0:
        raise ValueError("prompt is empty: give at least one token.")
    dtype = str(getattr(prompt, "dtype", ""))
    if dtype and "int" not in dtype:
        raise TypeError(f"prompt must hold integer token ids; got dtype {dtype}.")
    concrete = concrete_values(prompt)
    if concrete is not None and concrete.size:
        low, high = int(concrete.min()), int(concrete.max())
        if low < 0 or high >= adapter.vocab_size:
            raise ValueError(
                f"prompt ids must be in [0, {adapter.vocab_size}) (the vocabulary); got ids "
                f"from {low} to {high}."
            )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int; got {max_new_tokens!r}.")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0; got {max_new_tokens}.")
    if shape[1] is not None and shape[1] + max_new_tokens > adapter.max_length:
        raise ValueError(
            f"prompt length {shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_length={adapter.max_length}."
        )
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}; got {sampling!r}.")
    # Written so that NaN fails every comparison and is refused.
    if not temperature > 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need temperature > 0, top_k >= 0 and top_p in (0, 1]; got {temperature}, "
            f"{top_k}, {top_p}."
        )
    if padding_mask is not None:
        _validate_padding_mask(padding_mask, shape)
    return prompt


def concrete_values(value):
    """`value` as a numpy array when it holds concrete values (not a traced tensor)."""
    try:
        return np.asarray(value)
    except Exception:  # noqa: BLE001 - symbolic tensors (tf.function, jax.jit) have no values
        return None


def _validate_padding_mask(padding_mask, prompt_shape):
    mask_shape = tuple(padding_mask.shape) if hasattr(padding_mask, "shape") else None
    if mask_shape is None:
        padding_mask = np.asarray(padding_mask)
        mask_shape = padding_mask.shape
    if tuple(mask_shape) != tuple(prompt_shape):
        raise ValueError(
            f"padding_mask must have the prompt's shape {tuple(prompt_shape)}; got "
            f"{tuple(mask_shape)}."
        )
    mask = concrete_values(padding_mask)
    if mask is None:
        return
    mask = mask.astype(bool)
    if not mask[:, -1].all():
        raise ValueError(
            "padding_mask must mark left padding: every row's last prompt token must be real "
            f"(rows {np.flatnonzero(~mask[:, -1]).tolist()} end in padding). Use pad_prompts."
        )
    # Left padding: once a row's real tokens start, they continue to the end.
    if (np.diff(mask.astype(int), axis=1) < 0).any():
        rows = np.flatnonzero((np.diff(mask.astype(int), axis=1) < 0).any(axis=1)).tolist()
        raise ValueError(
            f"padding_mask rows {rows} have padding between real tokens; only left padding "
            "is supported (pad_prompts makes it)."
        )
