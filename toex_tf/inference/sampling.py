"""Choosing the next token from logits: greedy, or seeded sampling (temperature, top-k,
top-p) with stateless hashed noise that runs inside compiled loops on any backend."""

import numpy as np
from keras import ops

SAMPLING = ("greedy", "sample")


def sample_next(logits, sampling="greedy", temperature=1.0, top_k=0, top_p=1.0, seed=None):
    """Next token ids `(batch,)` from logits `(batch, vocab)`.

    `sample` draws from `softmax(logits / temperature)` restricted to the `top_k` most
    likely tokens (0: no limit) and to the smallest set whose probability reaches `top_p`.
    """
    if sampling == "greedy":
        return ops.cast(ops.argmax(logits, axis=-1), "int32")
    if sampling != "sample":
        raise ValueError(f"sampling must be one of {SAMPLING}; got {sampling!r}.")
    logits = ops.cast(logits, "float32") / temperature
    if top_k:
        kth = ops.top_k(logits, k=top_k)[0][:, -1:]
        logits = ops.where(logits < kth, -1e9, logits)
    if top_p < 1.0:
        sorted_logits = ops.flip(ops.sort(logits, axis=-1), axis=-1)
        cumulative = ops.cumsum(ops.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep tokens until the cumulative mass first reaches top_p (the first always).
        keep = ops.concatenate(
            [ops.ones_like(cumulative[:, :1], "bool"), cumulative[:, :-1] < top_p], axis=-1
        )
        cutoff = ops.min(ops.where(keep, sorted_logits, 1e9), axis=-1, keepdims=True)
        logits = ops.where(logits < cutoff, -1e9, logits)
    # Gumbel-max with stateless hashed noise: keras.random takes no tensor seeds, and a
    # stateful SeedGenerator cannot live inside a jitted loop.
    noise = -ops.log(-ops.log(hashed_uniform(ops.shape(logits), seed)))
    return ops.cast(ops.argmax(logits + noise, axis=-1), "int32")


def _uint32(value):
    return ops.convert_to_tensor(np.uint32(value))


def hashed_uniform(shape, seed):
    """Stateless uniforms in (0, 1) of a 2-D `shape`, a pure function of `seed` (2 ints).

    Each element hashes (seed, row, column) with the murmur3 32-bit finaliser; ops only,
    so it runs inside `tf.function` and `jax.jit` loops on any backend.
    """
    rows = ops.cast(ops.arange(shape[0]), "uint32")[:, None]
    columns = ops.cast(ops.arange(shape[1]), "uint32")[None, :]
    seed = ops.cast(seed, "uint32")
    h = columns + rows * _uint32(0x9E3779B1) + seed[0] * _uint32(0x85EBCA77)
    h = ops.bitwise_xor(h, seed[1] * _uint32(0xC2B2AE3D))
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ops.bitwise_xor(h, ops.right_shift(h, _uint32(shift)))
        h = h * _uint32(multiplier)
    h = ops.bitwise_xor(h, ops.right_shift(h, _uint32(16)))
    # The top 24 bits, centred in their bin: never exactly 0 or 1.
    return (ops.cast(ops.right_shift(h, _uint32(8)), "float32") + 0.5) * (1.0 / (1 << 24))
