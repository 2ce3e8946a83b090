"""`CausalSelfAttention`: multi-head / grouped-query causal attention with an optional KV cache."""

import keras
from keras import ops

from toex_tf.layers.attention_ops import causal_mask, multi_head_attention
from toex_tf.layers.layer_utils import (
    built_dense,
    check_kernel_layout,
    dense_part,
    get_initializer,
)
from toex_tf.layers.rotary_embedding import RotaryEmbedding


def write_kv_cache(cache, key, value, index):
    """Writes `key`/`value` `(batch, seq, kv_heads, head_dim)` into `cache` at `index`.

    The one place the cache is written. A scatter, not a dynamic-update-slice: TF's
    `XlaDynamicUpdateSlice` runs only through XLA (a compiled kernel per call here, and
    no TF Serving without XLA), while `TensorScatterUpdate` is a plain TF op; under JAX
    both lower to the same in-place update.

    Args:
        cache: `(batch, 2, kv_heads, max_length, head_dim)`, keys at index 0 of axis 1.
        key, value: the new entries.
        index: int or scalar tensor, position of `key[:, 0]`.

    Returns:
        The updated cache.
    """
    batch, length = ops.shape(key)[0], ops.shape(key)[1]
    kv_heads, head_dim = cache.shape[2], cache.shape[4]
    update = ops.cast(ops.stack([key, value], axis=1), cache.dtype)  # (b, 2, s, kv, d)
    if key.shape[1] != 1:  # one decode token: already head-major in memory
        update = ops.transpose(update, (0, 1, 3, 2, 4))
    grid = (batch, 2, kv_heads, length)
    positions = ops.cast(index, "int32") + ops.arange(length, dtype="int32")
    indices = ops.stack(
        [
            ops.broadcast_to(ops.arange(batch, dtype="int32")[:, None, None, None], grid),
            ops.broadcast_to(ops.arange(2, dtype="int32")[None, :, None, None], grid),
            ops.broadcast_to(ops.arange(kv_heads, dtype="int32")[None, None, :, None], grid),
            ops.broadcast_to(positions[None, None, None, :], grid),
        ],
        axis=-1,
    )
    return ops.scatter_update(
        cache, ops.reshape(indices, (-1, 4)), ops.reshape(update, (-1, head_dim))
    )


@keras.saving.register_keras_serializable(package="toex_tf")
class CausalSelfAttention(keras.layers.Layer):
    """Causal self-attention, MHA or GQA, with optional RoPE and an optional KV cache.

    The cache is a preallocated tensor `(batch, 2, kv_heads, max_length, head_dim)`
    (keys at index 0, values at 1) with static shape, written at `cache_update_index`.
    Static shapes keep one compiled decode step for every position.

    Args:
        num_heads: int, query heads.
        head_dim: int, width of one head.
        num_kv_heads: int or None, key/value heads; must divide `num_heads`. `None`
            means `num_heads` (MHA). Defaults to `None`.
        use_bias: bool, biases on the projections (GPT-2: True, Llama: False).
            Defaults to `True`.
        rope_theta: float or None, RoPE base; `None` disables RoPE (GPT-2 uses learned
            positions instead). Defaults to `None`.
        dropout: float, dropout on the attention probabilities. Defaults to `0.0`.
        kernel_initializer: initializer of the projections. Defaults to
            normal(stddev=0.02).
        kernel_layout: str, `"in_out"` (`keras.layers.Dense`) or `"out_in"` (`Linear`:
            kernels stored `(out, in)`, Hugging Face's layout and the faster one for
            batch-1 decoding with TensorFlow on CPU). Defaults to `"in_out"`.
        fused_qkv: bool, one projection `qkv` whose outputs are the queries, keys and
            values in that order (the rows of HF's `q_proj`, `k_proj`, `v_proj` stacked)
            instead of three. One product instead of three of unequal sizes: on
            TensorFlow's CPU kernels with row splits (`toex_tf.layers.linear`) its two
            halves keep both cores busy, and RoPE runs once over queries and keys.
            Defaults to `False`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(batch, seq, hidden)`.
        padding_mask: optional `(batch, key_len)` with 1/True for real tokens; without
            a cache `key_len == seq`, with one `key_len == max_length`.
        cache: optional `(batch, 2, kv_heads, max_length, head_dim)`.
        cache_update_index: int or scalar tensor, absolute position of `inputs[:, 0]`;
            required with `cache`.
        training: bool.

    Returns:
        `(batch, seq, hidden)`, or `(output, new_cache)` when `cache` is given.

    Example:
    >>> attention = CausalSelfAttention(num_heads=4, head_dim=8, num_kv_heads=2)
    >>> out = attention(np.zeros((2, 5, 32), "float32"))
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        num_kv_heads: int | None = None,
        use_bias: bool = True,
        rope_theta: float | None = None,
        dropout: float = 0.0,
        kernel_initializer="normal",
        kernel_layout: str = "in_out",
        fused_qkv: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads}.")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.use_bias = use_bias
        self.rope_theta = rope_theta
        self.dropout = dropout
        self.kernel_initializer = get_initializer(kernel_initializer)
        self.kernel_layout = check_kernel_layout(kernel_layout)
        self.fused_qkv = bool(fused_qkv)

    def build(self, input_shape):
        query_width = self.num_heads * self.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        self.qkv_dense = self.query_dense = self.key_dense = self.value_dense = None
        if self.fused_qkv:
            self.qkv_dense = built_dense(self, query_width + 2 * kv_width, "qkv", input_shape)
        else:
            self.query_dense = built_dense(self, query_width, "query", input_shape)
            self.key_dense = built_dense(self, kv_width, "key", input_shape)
            self.value_dense = built_dense(self, kv_width, "value", input_shape)
        self.output_dense = built_dense(
            self, input_shape[-1], "attention_output", tuple(input_shape[:-1]) + (query_width,)
        )
        self.rotary = None
        if self.rope_theta is not None:
            self.rotary = RotaryEmbedding(self.rope_theta, dtype=self.dtype_policy, name="rope")
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

    def project_kv(self, inputs, start_index=0):
        """Keys and values `(batch, seq, kv_heads, head_dim)` for `inputs`, RoPE applied.

        Only the key and value products run (with `fused_qkv`, the kernel's key/value
        part): the frozen exit mode calls this for the layers a token skipped.
        """
        batch, seq = ops.shape(inputs)[0], ops.shape(inputs)[1]
        shape = (batch, seq, self.num_kv_heads, self.head_dim)
        if self.fused_qkv:
            query_width = self.num_heads * self.head_dim
            both = dense_part(self.qkv_dense, inputs, query_width, None)
            key, value = ops.split(both, 2, axis=-1)
        else:
            key, value = self.key_dense(inputs), self.value_dense(inputs)
        key, value = ops.reshape(key, shape), ops.reshape(value, shape)
        if self.rotary is not None:
            key = self.rotary(key, start_index=start_index)
        return key, value

    def _project_qkv(self, inputs, start):
        """Queries `(batch, seq, heads, head_dim)`, keys and values (RoPE applied)."""
        batch, seq = ops.shape(inputs)[0], ops.shape(inputs)[1]
        if not self.fused_qkv:
            query = self.query_dense(inputs)
            query = ops.reshape(query, (batch, seq, self.num_heads, self.head_dim))
            if self.rotary is not None:
                query = self.rotary(query, start_index=start)
            return (query, *self.project_kv(inputs, start_index=start))
        heads, kv_heads = self.num_heads, self.num_kv_heads
        fused = self.qkv_dense(inputs)
        rotated, value = ops.split(fused, [(heads + kv_heads) * self.head_dim], axis=-1)
        rotated = ops.reshape(rotated, (batch, seq, heads + kv_heads, self.head_dim))
        if self.rotary is not None:  # one rotation over the query and key heads
            rotated = self.rotary(rotated, start_index=start)
        query, key = ops.split(rotated, [heads], axis=2)
        value = ops.reshape(value, (batch, seq, kv_heads, self.head_dim))
        return query, key, value

    def call(self, inputs, padding_mask=None, cache=None, cache_update_index=None, training=None):
        batch, seq = ops.shape(inputs)[0], ops.shape(inputs)[1]
        start = 0 if cache is None else cache_update_index
        if cache is not None and cache_update_index is None:
            raise ValueError("cache_update_index is required when a cache is given.")
        query, key, value = self._project_qkv(inputs, start)
        if cache is not None:
            cache = write_kv_cache(cache, key, value, cache_update_index)
            key, value, layout = cache[:, 0], cache[:, 1], "bhsd"
        else:
            layout = "bshd"
        key_length = ops.shape(key)[2 if layout == "bhsd" else 1]
        mask = causal_mask(seq, key_length, query_offset=start)[None, None]
        if padding_mask is not None:
            mask = ops.logical_and(mask, ops.cast(padding_mask, "bool")[:, None, None, :])
        attended = multi_head_attention(
            query,
            key,
            value,
            mask=mask,
            dropout_layer=self.dropout_layer,
            training=training,
            kv_layout=layout,
        )
        output = self.output_dense(
            ops.reshape(attended, (batch, seq, self.num_heads * self.head_dim))
        )
        if cache is not None:
            return output, cache
        return output

    def compute_output_spec(self, inputs, cache=None, **kwargs):
        output = keras.KerasTensor(inputs.shape, self.compute_dtype)
        if cache is not None:
            return output, keras.KerasTensor(cache.shape, cache.dtype)
        return output

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "num_kv_heads": self.num_kv_heads,
            "use_bias": self.use_bias,
            "rope_theta": self.rope_theta,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_layout": self.kernel_layout,
            "fused_qkv": self.fused_qkv,
        }
