"""`EncoderBlock`: a pre-norm bidirectional encoder block (the encoder of a seq2seq model)."""

import keras

from toex_tf.layers.cross_attention import CrossAttention
from toex_tf.layers.feed_forward import FeedForward
from toex_tf.layers.transformer_block import NORM_TYPES, make_norm


@keras.saving.register_keras_serializable(package="toex_tf")
class EncoderBlock(keras.layers.Layer):
    """Pre-norm encoder block: `x + Attention(norm(x), norm(x))`, then `x + FFN(norm(x))`.

    The attention is bidirectional (every token sees every real source token), which is
    `CrossAttention` with the sequence attending to itself under the padding mask, so
    the encoder and the decoder's cross-attention share one implementation.

    Args:
        num_heads: int, attention heads.
        head_dim: int, width of one head.
        intermediate_dim: int, FFN inner width.
        norm_type: str, `"layer_norm"` or `"rms_norm"`. Defaults to `"layer_norm"`.
        norm_epsilon: float. Defaults to `1e-5`.
        activation: str, FFN activation. Defaults to `"gelu"`.
        use_bias: bool. Defaults to `True`.
        dropout: float, residual and attention dropout. Defaults to `0.0`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(batch, source_len, hidden)`.
        padding_mask: optional `(batch, source_len)`, 1/True for real tokens.
        training: bool.

    Returns:
        `(batch, source_len, hidden)`.

    Example:
    >>> block = EncoderBlock(num_heads=2, head_dim=8, intermediate_dim=64)
    >>> out = block(np.zeros((2, 5, 16), "float32"), padding_mask=np.ones((2, 5), "int32"))

    References:
        Vaswani et al., "Attention Is All You Need", 2017 (pre-norm: Xiong et al., 2020).
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        intermediate_dim: int,
        norm_type: str = "layer_norm",
        norm_epsilon: float = 1e-5,
        activation: str = "gelu",
        use_bias: bool = True,
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}; got {norm_type!r}.")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.intermediate_dim = intermediate_dim
        self.norm_type = norm_type
        self.norm_epsilon = norm_epsilon
        self.activation = activation
        self.use_bias = use_bias
        self.dropout = dropout

    def build(self, input_shape):
        policy = self.dtype_policy
        self.attention_norm = make_norm(self.norm_type, self.norm_epsilon, policy, "attention_norm")
        self.attention_norm.build(input_shape)
        self.self_attention = CrossAttention(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            use_bias=self.use_bias,
            dropout=self.dropout,
            dtype=policy,
            name="self_attention",
        )
        self.self_attention.build(input_shape, input_shape)
        self.ffn_norm = make_norm(self.norm_type, self.norm_epsilon, policy, "ffn_norm")
        self.ffn_norm.build(input_shape)
        self.ffn = FeedForward(
            intermediate_dim=self.intermediate_dim,
            activation=self.activation,
            use_bias=self.use_bias,
            dtype=policy,
            name="ffn",
        )
        self.ffn.build(input_shape)
        self.residual_dropout = keras.layers.Dropout(self.dropout, dtype=policy)

    def call(self, inputs, padding_mask=None, training=None):
        normed = self.attention_norm(inputs)
        attended = self.self_attention(normed, normed, padding_mask, training=training)
        x = inputs + self.residual_dropout(attended, training=training)
        delta = self.ffn(self.ffn_norm(x), training=training)
        return x + self.residual_dropout(delta, training=training)

    def compute_output_spec(self, inputs, **kwargs):
        return keras.KerasTensor(inputs.shape, self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "intermediate_dim": self.intermediate_dim,
            "norm_type": self.norm_type,
            "norm_epsilon": self.norm_epsilon,
            "activation": self.activation,
            "use_bias": self.use_bias,
            "dropout": self.dropout,
        }
