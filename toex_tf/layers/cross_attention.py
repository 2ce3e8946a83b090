"""`CrossAttention`: decoder-to-encoder attention for encoder-decoder models."""

import keras
from keras import ops

from toex_tf.layers.attention_ops import multi_head_attention
from toex_tf.layers.layer_utils import built_dense, get_initializer


@keras.saving.register_keras_serializable(package="toex_tf")
class CrossAttention(keras.layers.Layer):
    """Multi-head attention from decoder positions to encoder outputs (not causal).

    Args:
        num_heads: int, attention heads.
        head_dim: int, width of one head.
        use_bias: bool, biases on the projections. Defaults to `True`.
        dropout: float, dropout on the attention probabilities. Defaults to `0.0`.
        kernel_initializer: initializer of the projections. Defaults to
            normal(stddev=0.02).
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: decoder states `(batch, target_len, hidden)`.
        encoder_outputs: `(batch, source_len, encoder_hidden)`.
        encoder_padding_mask: optional `(batch, source_len)`, 1/True for real tokens.
        encoder_kv: optional `(key, value)` from `project_kv(encoder_outputs)`: the
            encoder side projected once per sentence, so each decode step skips it
            (`encoder_outputs` is then not read and may be None).
        training: bool.

    Returns:
        `(batch, target_len, hidden)`.

    Example:
    >>> cross = CrossAttention(num_heads=2, head_dim=8)
    >>> out = cross(np.zeros((1, 3, 16), "float32"), np.zeros((1, 7, 16), "float32"))
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        use_bias: bool = True,
        dropout: float = 0.0,
        kernel_initializer="normal",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.use_bias = use_bias
        self.dropout = dropout
        self.kernel_initializer = get_initializer(kernel_initializer)

    def build(self, inputs_shape, encoder_outputs_shape=None):
        hidden_dim = inputs_shape[-1]
        encoder_outputs_shape = encoder_outputs_shape or inputs_shape
        width = self.num_heads * self.head_dim
        self.query_dense = built_dense(self, width, "query", inputs_shape)
        self.key_dense = built_dense(self, width, "key", encoder_outputs_shape)
        self.value_dense = built_dense(self, width, "value", encoder_outputs_shape)
        self.output_dense = built_dense(self, hidden_dim, "attention_output", (None, None, width))
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

    def project_kv(self, encoder_outputs):
        """Keys and values of `encoder_outputs`, each `(batch, source_len, heads, head_dim)`.

        A decoder computes them once per source sentence and passes them to every step
        as `encoder_kv`: they do not depend on the target position.
        """
        batch, source_len = ops.shape(encoder_outputs)[0], ops.shape(encoder_outputs)[1]
        kv_shape = (batch, source_len, self.num_heads, self.head_dim)
        key = ops.reshape(self.key_dense(encoder_outputs), kv_shape)
        value = ops.reshape(self.value_dense(encoder_outputs), kv_shape)
        return key, value

    def call(
        self,
        inputs,
        encoder_outputs=None,
        encoder_padding_mask=None,
        encoder_kv=None,
        training=None,
    ):
        batch, target_len = ops.shape(inputs)[0], ops.shape(inputs)[1]
        if encoder_kv is None:
            if encoder_outputs is None:
                raise ValueError("CrossAttention needs encoder_outputs or encoder_kv; got neither.")
            encoder_kv = self.project_kv(encoder_outputs)
        key, value = encoder_kv
        query = ops.reshape(
            self.query_dense(inputs), (batch, target_len, self.num_heads, self.head_dim)
        )
        mask = None
        if encoder_padding_mask is not None:
            mask = ops.cast(encoder_padding_mask, "bool")[:, None, None, :]
        attended = multi_head_attention(
            query, key, value, mask=mask, dropout_layer=self.dropout_layer, training=training
        )
        return self.output_dense(
            ops.reshape(attended, (batch, target_len, self.num_heads * self.head_dim))
        )

    def compute_output_spec(self, inputs, encoder_outputs=None, **kwargs):
        return keras.KerasTensor(inputs.shape, self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "use_bias": self.use_bias,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        }
