"""`translate`: encoder-decoder generation on the shared decode engine.

The encoder runs once per batch of sources, and each decoder layer's cross-attention
keys and values are projected from its output once (`decoder_context`). The decoder
then runs through the same engine as a decoder-only model, from one start token per
row, in any exit mode: `generate` (full, unfrozen, frozen, lazy; greedy or sampling) or
`generate_speculative`. Sources of different lengths are right-padded with a padding
mask (`pad_sources`); the targets all start at position 0, so they need no padding.
"""

import numpy as np
from keras import ops

from toex_tf.inference.loop import generate
from toex_tf.inference.prompts import concrete_values
from toex_tf.inference.speculative import generate_speculative


def pad_sources(sources, pad_id: int = 0, length: int | None = None):
    """Right-pads token-id lists: `(source_ids, source_padding_mask)` int32 arrays.

    Args:
        sources: a list of token-id lists, none empty.
        pad_id: int, the id in padded slots (masked out; any id works). Defaults to 0.
        length: int or None, the padded length (a fixed shape avoids retracing a
            compiled function); None: the longest source.
    """
    rows = [list(row) for row in sources]
    if not rows:
        raise ValueError("sources is empty: give at least one source sentence.")
    empty = [index for index, row in enumerate(rows) if not row]
    if empty:
        raise ValueError(f"sources {empty} are empty: every source needs at least one token.")
    longest = max(len(row) for row in rows)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(f"a source has {longest} tokens, more than length={length}.")
    ids = np.full((len(rows), length), pad_id, "int32")
    mask = np.zeros((len(rows), length), "int32")
    for index, row in enumerate(rows):
        ids[index, : len(row)] = row
        mask[index, : len(row)] = 1
    return ids, mask


def validate_sources(adapter, source_ids, source_padding_mask) -> None:
    """Checks the sources at the boundary (shapes always; values when they are concrete)."""
    model = adapter.model
    shape = tuple(source_ids.shape)
    if len(shape) != 2:
        raise ValueError(f"source_ids must be (batch, source_length) token ids; got shape {shape}.")
    mask_shape = tuple(source_padding_mask.shape)
    if mask_shape != shape:
        raise ValueError(
            f"source_padding_mask must have source_ids' shape {shape}; got {mask_shape}."
        )
    if shape[1] == 0:
        raise ValueError("source_ids is empty: give at least one source token.")
    if shape[1] is not None and shape[1] > model.max_source_length:
        raise ValueError(
            f"source length {shape[1]} exceeds the model's max_source_length="
            f"{model.max_source_length}."
        )
    dtype = str(getattr(source_ids, "dtype", ""))
    if dtype and "int" not in dtype:
        raise TypeError(f"source_ids must hold integer token ids; got dtype {dtype}.")
    ids, mask = concrete_values(source_ids), concrete_values(source_padding_mask)
    if ids is not None and ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= adapter.vocab_size:
            raise ValueError(
                f"source ids must be in [0, {adapter.vocab_size}) (the vocabulary); got ids "
                f"from {low} to {high}."
            )
    if mask is not None and mask.size:
        empty = np.flatnonzero(~mask.astype(bool).any(axis=1)).tolist()
        if empty:
            raise ValueError(
                f"source rows {empty} have no real token in source_padding_mask: every "
                "source needs at least one."
            )


def translate(
    adapter,
    source_ids,
    source_padding_mask,
    max_new_tokens: int,
    start_id: int,
    policy=None,
    draft_layer: int | None = None,
    draft_length: int = 4,
    **options,
):
    """Generates target tokens for a batch of sources, with decoder exits.

    Args:
        adapter: `DecoderAdapter` of an encoder-decoder model (`EarlyExitTransformer`).
        source_ids: int `(batch, source_length)`, right-padded (`pad_sources`).
        source_padding_mask: `(batch, source_length)`, 1 for real tokens.
        max_new_tokens: int, target tokens to generate (at most `max_length - 1`: the
            start token takes position 0).
        start_id: int, the decoder's start token (the tokenizer's eos, as in fairseq).
        policy: the `ExitPolicy` (default full depth); ignored with `draft_layer`.
        draft_layer: None, or the exit layer that drafts: lossless self-speculative
            greedy decoding (`generate_speculative`) instead of `generate`.
        draft_length: drafted tokens per round (speculative only).
        **options: the other arguments of `generate` (`sampling`, `temperature`,
            `top_k`, `top_p`, `stop_token_ids`, `seed`, `return_state`,
            `new_token_limit`), or `return_state` and `stop_token_ids` for the
            speculative loop.

    Returns:
        What `generate` (or `generate_speculative`) returns: `(token_ids, exit_layers)`
        of shape `(batch, max_new_tokens)`, plus the state dict with `return_state`.
    """
    if not hasattr(source_ids, "shape"):
        source_ids = np.asarray(source_ids, "int32")
    if not hasattr(source_padding_mask, "shape"):
        source_padding_mask = np.asarray(source_padding_mask, "int32")
    validate_sources(adapter, source_ids, source_padding_mask)
    if isinstance(start_id, bool) or not isinstance(start_id, int):
        raise TypeError(f"start_id must be an int token id; got {start_id!r}.")
    if not 0 <= start_id < adapter.vocab_size:
        raise ValueError(f"start_id must be in [0, {adapter.vocab_size}); got {start_id}.")
    source_ids = ops.cast(ops.convert_to_tensor(source_ids), "int32")
    source_padding_mask = ops.cast(ops.convert_to_tensor(source_padding_mask), "int32")
    decoder = adapter.with_context(adapter.model.decoder_context(source_ids, source_padding_mask))
    batch = ops.shape(source_ids)[0]
    start = ops.full((batch, 1), start_id, "int32")
    if draft_layer is not None:
        return generate_speculative(
            decoder,
            start,
            max_new_tokens,
            draft_layer,
            draft_length,
            **options,
        )
    return generate(decoder, start, max_new_tokens, policy=policy, **options)
