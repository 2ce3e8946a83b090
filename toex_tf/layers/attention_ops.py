"""Attention math shared by `CausalSelfAttention` and `CrossAttention` (functions, no weights)."""

from keras import ops

# Added to masked scores before the softmax. Finite, so a fully masked row (a padded
# query) gives a uniform distribution instead of NaN.
MASK_VALUE = -1e9


def causal_mask(query_length, key_length, query_offset=0):
    """Bool `(query_length, key_length)`: query i (absolute position offset + i) sees keys <= it."""
    query_positions = ops.arange(query_length, dtype="int32") + ops.cast(query_offset, "int32")
    key_positions = ops.arange(key_length, dtype="int32")
    return ops.less_equal(key_positions[None, :], query_positions[:, None])


def multi_head_attention(
    query, key, value, mask=None, dropout_layer=None, training=None, kv_layout="bshd"
):
    """Scaled dot-product attention with grouped key/value heads.

    Each key/value head serves its group of `heads // kv_heads` query heads without
    being repeated, and the maths runs head-major: with head-major keys (the KV cache's
    layout) and one query token, nothing is transposed. On TensorFlow's CPU kernels the
    transposes and the repeat of the head-minor form cost about 5% of a TinyLlama decode
    step (measured on 2 cores).

    Args:
        query: `(batch, q_len, heads, head_dim)`.
        key: `(batch, k_len, kv_heads, head_dim)` (`kv_layout="bshd"`), or
            `(batch, kv_heads, k_len, head_dim)` (`"bhsd"`, the KV cache's layout);
            `heads` must be a multiple of `kv_heads` (GQA; `kv_heads == heads` is MHA).
        value: like `key`.
        mask: optional bool, broadcastable to `(batch, 1, q_len, k_len)`; True = attend.
        dropout_layer: optional `keras.layers.Dropout` applied to the probabilities.
        training: passed to the dropout layer.
        kv_layout: `"bshd"` or `"bhsd"`, the layout of `key` and `value`.

    Returns:
        `(batch, q_len, heads, head_dim)` in the query's dtype.
    """
    if kv_layout == "bshd":
        key = ops.transpose(key, (0, 2, 1, 3))
        value = ops.transpose(value, (0, 2, 1, 3))
    elif kv_layout != "bhsd":
        raise ValueError(f"kv_layout must be 'bshd' or 'bhsd'; got {kv_layout!r}.")
    heads, head_dim, kv_heads = query.shape[2], query.shape[3], key.shape[1]
    if heads % kv_heads:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}.")
    group = heads // kv_heads
    batch, query_length = ops.shape(query)[0], ops.shape(query)[1]
    single = query.shape[1] == 1  # static: one decode token, reshapes only
    grouped = ops.reshape(query, (batch, query_length, kv_heads, group, head_dim))
    if not single:
        grouped = ops.transpose(grouped, (0, 2, 1, 3, 4))
    # Rows of a key/value head: its group's queries, ordered (position, head).
    grouped = ops.reshape(grouped, (batch, kv_heads, query_length * group, head_dim))
    scores = ops.einsum("bkrd,bksd->bkrs", grouped, key)
    # Float32 island: bf16 scores lose the differences the softmax resolves.
    scores = ops.cast(scores, "float32") * (1.0 / float(head_dim) ** 0.5)
    if mask is not None:
        if mask.shape[1] != 1:
            raise ValueError(f"mask must broadcast over heads (axis 1 of 1); got {mask.shape}.")
        key_length = ops.shape(scores)[-1]
        scores = ops.reshape(scores, (batch, kv_heads, query_length, group, key_length))
        scores = ops.where(ops.expand_dims(mask, 3), scores, MASK_VALUE)
        scores = ops.reshape(scores, (batch, kv_heads, query_length * group, key_length))
    probs = ops.cast(ops.softmax(scores, axis=-1), query.dtype)
    if dropout_layer is not None:
        probs = dropout_layer(probs, training=training)
    out = ops.einsum("bkrs,bksd->bkrd", probs, value)
    if not single:
        out = ops.reshape(out, (batch, kv_heads, query_length, group, head_dim))
        out = ops.transpose(out, (0, 2, 1, 3, 4))
    return ops.reshape(out, (batch, query_length, heads, head_dim))
