"""`TransformerBlock`: a pre-norm decoder block shared by the GPT, Llama and seq2seq models."""

import keras

from toex_tf.layers.causal_self_attention import CausalSelfAttention
from toex_tf.layers.cross_attention import CrossAttention
from toex_tf.layers.feed_forward import FeedForward
from toex_tf.layers.layer_utils import check_kernel_layout
from toex_tf.layers.rms_norm import RMSNorm
from toex_tf.layers.skip_router import SkipRouter

NORM_TYPES = ("layer_norm", "rms_norm")


def make_norm(norm_type: str, epsilon: float, dtype=None, name=None) -> keras.layers.Layer:
    """LayerNorm (GPT-2) or RMSNorm (Llama)."""
    if norm_type == "layer_norm":
        return keras.layers.LayerNormalization(epsilon=epsilon, dtype=dtype, name=name)
    if norm_type == "rms_norm":
        return RMSNorm(epsilon=epsilon, dtype=dtype, name=name)
    raise ValueError(f"norm_type must be one of {NORM_TYPES}; got {norm_type!r}.")


@keras.saving.register_keras_serializable(package="toex_tf")
class TransformerBlock(keras.layers.Layer):
    """Pre-norm transformer decoder block.

    `x + SelfAttention(norm(x))`, then optionally `x + CrossAttention(norm(x), encoder)`,
    then `x + FFN(norm(x))`. With `capacity < 1` the FFN is wrapped in a `SkipRouter`,
    so only a share of the tokens pays for it.

    The configuration covers GPT-2 (LayerNorm, GELU, biases, learned positions outside
    the block), Llama (RMSNorm, SwiGLU, no biases, RoPE, grouped KV heads) and the
    decoder of an encoder-decoder model (`cross_attention=True`).

    Args:
        num_heads: int, query heads.
        head_dim: int, width of one head.
        intermediate_dim: int, FFN inner width.
        num_kv_heads: int or None, key/value heads (GQA). Defaults to `None` (= heads).
        norm_type: str, `"layer_norm"` or `"rms_norm"`. Defaults to `"layer_norm"`.
        norm_epsilon: float. Defaults to `1e-5`.
        activation: str, FFN activation: `"gelu"`, `"relu"` or `"swiglu"`.
            Defaults to `"gelu"`.
        use_bias: bool. Defaults to `True`.
        rope_theta: float or None, RoPE base; None for no RoPE. Defaults to `None`.
        cross_attention: bool, add encoder-decoder attention. Defaults to `False`.
        dropout: float, residual and attention dropout. Defaults to `0.0`.
        capacity: float in (0, 1], FFN routing capacity. Defaults to `1.0` (no router).
        router_config: dict, extra `SkipRouter` arguments. Defaults to `None`.
        kernel_layout: str, the self-attention and FFN kernels' layout: `"in_out"`
            (`keras.layers.Dense`) or `"out_in"` (`Linear`). Defaults to `"in_out"`.
        fused_qkv: bool, one query/key/value projection (`CausalSelfAttention`).
            Defaults to `False`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(batch, seq, hidden)`.
        padding_mask: optional `(batch, key_len)` key mask.
        encoder_outputs: `(batch, source_len, hidden)`; required with cross-attention.
        encoder_padding_mask: optional `(batch, source_len)`.
        encoder_kv: optional `(key, value)` of the cross-attention, projected once per
            source (`CrossAttention.project_kv`); replaces `encoder_outputs`.
        cache: optional self-attention KV cache (see `CausalSelfAttention`).
        cache_update_index: position of `inputs[:, 0]` when a cache is given.
        training: bool.
        routing: optional `SkipRouter` routing override.
        return_ffn_input: bool, also return the FFN's (normed) input, what a skip
            router decides on. Defaults to `False`.

    Returns:
        `(batch, seq, hidden)`; then the FFN input with `return_ffn_input`, then the new
        cache when `cache` is given (a tuple when there is more than the output).

    Example:
    >>> block = TransformerBlock(num_heads=2, head_dim=8, intermediate_dim=64)
    >>> out = block(np.zeros((2, 5, 16), "float32"))
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        intermediate_dim: int,
        num_kv_heads: int | None = None,
        norm_type: str = "layer_norm",
        norm_epsilon: float = 1e-5,
        activation: str = "gelu",
        use_bias: bool = True,
        rope_theta: float | None = None,
        cross_attention: bool = False,
        dropout: float = 0.0,
        capacity: float = 1.0,
        router_config: dict | None = None,
        kernel_layout: str = "in_out",
        fused_qkv: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type must be one of {NORM_TYPES}; got {norm_type!r}.")
        if isinstance(capacity, bool) or not 0.0 < float(capacity) <= 1.0:
            raise ValueError(f"capacity must be in (0, 1]; got {capacity!r}.")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.intermediate_dim = intermediate_dim
        self.num_kv_heads = num_kv_heads or num_heads
        self.norm_type = norm_type
        self.norm_epsilon = norm_epsilon
        self.activation = activation
        self.use_bias = use_bias
        self.rope_theta = rope_theta
        self.cross_attention = cross_attention
        self.dropout = dropout
        self.capacity = float(capacity)
        self.router_config = dict(router_config or {})
        self.kernel_layout = check_kernel_layout(kernel_layout)
        self.fused_qkv = bool(fused_qkv)

    def build(self, input_shape):
        policy = self.dtype_policy
        self.attention_norm = make_norm(self.norm_type, self.norm_epsilon, policy, "attention_norm")
        self.attention_norm.build(input_shape)
        self.self_attention = CausalSelfAttention(
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            num_kv_heads=self.num_kv_heads,
            use_bias=self.use_bias,
            rope_theta=self.rope_theta,
            dropout=self.dropout,
            kernel_layout=self.kernel_layout,
            fused_qkv=self.fused_qkv,
            dtype=policy,
            name="self_attention",
        )
        self.self_attention.build(input_shape)
        self.cross_norm = self.cross_attention_layer = None
        if self.cross_attention:
            self.cross_norm = make_norm(self.norm_type, self.norm_epsilon, policy, "cross_norm")
            self.cross_norm.build(input_shape)
            self.cross_attention_layer = CrossAttention(
                num_heads=self.num_heads,
                head_dim=self.head_dim,
                use_bias=self.use_bias,
                dropout=self.dropout,
                dtype=policy,
                name="cross_attention",
            )
            self.cross_attention_layer.build(input_shape, input_shape)
        self.ffn_norm = make_norm(self.norm_type, self.norm_epsilon, policy, "ffn_norm")
        self.ffn_norm.build(input_shape)
        self.ffn = FeedForward(
            intermediate_dim=self.intermediate_dim,
            activation=self.activation,
            use_bias=self.use_bias,
            kernel_layout=self.kernel_layout,
            dtype=policy,
            name="ffn",
        )
        if self.capacity < 1.0:
            self.ffn = SkipRouter(
                self.ffn,
                capacity=self.capacity,
                dtype=policy,
                name="skip_router",
                **self.router_config,
            )
        self.ffn.build(input_shape)
        self.residual_dropout = keras.layers.Dropout(self.dropout, dtype=policy)

    def call(
        self,
        inputs,
        padding_mask=None,
        encoder_outputs=None,
        encoder_padding_mask=None,
        cache=None,
        cache_update_index=None,
        training=None,
        routing=None,
        return_ffn_input=False,
        encoder_kv=None,
    ):
        attended = self.self_attention(
            self.attention_norm(inputs),
            padding_mask=padding_mask,
            cache=cache,
            cache_update_index=cache_update_index,
            training=training,
        )
        if cache is not None:
            attended, cache = attended
        x = inputs + self.residual_dropout(attended, training=training)
        if self.cross_attention:
            if encoder_outputs is None and encoder_kv is None:
                raise ValueError(
                    "a block with cross_attention needs encoder_outputs or encoder_kv; got neither."
                )
            crossed = self.cross_attention_layer(
                self.cross_norm(x),
                encoder_outputs,
                encoder_padding_mask,
                encoder_kv=encoder_kv,
                training=training,
            )
            x = x + self.residual_dropout(crossed, training=training)
        normed = self.ffn_norm(x)
        if isinstance(self.ffn, SkipRouter):
            delta = self.ffn(normed, training=training, routing=routing)
        else:
            delta = self.ffn(normed, training=training)
        x = x + self.residual_dropout(delta, training=training)
        outputs = [x]
        if return_ffn_input:
            outputs.append(normed)
        if cache is not None:
            outputs.append(cache)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def compute_output_spec(self, inputs, cache=None, return_ffn_input=False, **kwargs):
        outputs = [keras.KerasTensor(inputs.shape, self.compute_dtype)]
        if return_ffn_input:
            outputs.append(keras.KerasTensor(inputs.shape, self.compute_dtype))
        if cache is not None:
            outputs.append(keras.KerasTensor(cache.shape, cache.dtype))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "intermediate_dim": self.intermediate_dim,
            "num_kv_heads": self.num_kv_heads,
            "norm_type": self.norm_type,
            "norm_epsilon": self.norm_epsilon,
            "activation": self.activation,
            "use_bias": self.use_bias,
            "rope_theta": self.rope_theta,
            "cross_attention": self.cross_attention,
            "dropout": self.dropout,
            "capacity": self.capacity,
            "router_config": self.router_config,
            "kernel_layout": self.kernel_layout,
            "fused_qkv": self.fused_qkv,
        }
