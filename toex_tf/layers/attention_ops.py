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


def multi_head_attention(query, key, value, mask=None, dropout_layer=None, training=None):
    """Scaled dot-product attention with grouped key/value heads.

    Args:
        query: `(batch, q_len, heads, head_dim)`.
        key: `(batch, k_len, kv_heads, head_dim)`; `heads` must be a multiple of
            `kv_heads` (grouped-query attention, with `kv_heads == heads` being MHA).
        value: like `key`.
        mask: optional bool, broadcastable to `(batch, heads, q_len, k_len)`; True = attend.
        dropout_layer: optional `keras.layers.Dropout` applied to the probabilities.
        training: passed to the dropout layer.

    Returns:
        `(batch, q_len, heads, head_dim)` in the query's dtype.
    """
    heads, kv_heads = query.shape[2], key.shape[2]
    if heads != kv_heads:
        key = ops.repeat(key, heads // kv_heads, axis=2)
        value = ops.repeat(value, heads // kv_heads, axis=2)
    head_dim = query.shape[-1]
    scores = ops.einsum("bqhd,bkhd->bhqk", query, key)
    # Float32 island: bf16 scores lose the differences the softmax resolves.
    scores = ops.cast(scores, "float32") * (1.0 / float(head_dim) ** 0.5)
    if mask is not None:
        scores = ops.where(mask, scores, MASK_VALUE)
    probs = ops.cast(ops.softmax(scores, axis=-1), query.dtype)
    if dropout_layer is not None:
        probs = dropout_layer(probs, training=training)
    return ops.einsum("bhqk,bkhd->bqhd", probs, value)
