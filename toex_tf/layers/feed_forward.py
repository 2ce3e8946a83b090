"""`FeedForward`: the position-wise MLP of a transformer block (GELU or SwiGLU)."""

import keras
from keras import ops

from toex_tf.layers.layer_utils import built_dense, check_kernel_layout, get_initializer

ACTIVATIONS = ("gelu", "relu", "swiglu")


@keras.saving.register_keras_serializable(package="toex_tf")
class FeedForward(keras.layers.Layer):
    """Position-wise feed-forward network.

    - `gelu` / `relu`: `down(act(up(x)))` (GPT-2 uses the tanh-approximated GELU).
    - `swiglu`: `down(silu(gate(x)) * up(x))` (Llama).

    Args:
        intermediate_dim: int, inner width.
        activation: str, one of `"gelu"`, `"relu"`, `"swiglu"`. Defaults to `"gelu"`.
        use_bias: bool. Defaults to `True`.
        dropout: float, dropout on the output. Defaults to `0.0`.
        kernel_initializer: initializer. Defaults to normal(stddev=0.02).
        kernel_layout: str, `"in_out"` (`keras.layers.Dense`) or `"out_in"` (`Linear`:
            kernels stored `(out, in)`). Defaults to `"in_out"`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(..., hidden)`.
        training: bool.

    Example:
    >>> ffn = FeedForward(intermediate_dim=64, activation="swiglu", use_bias=False)
    >>> out = ffn(np.zeros((2, 5, 16), "float32"))
    """

    def __init__(
        self,
        intermediate_dim: int,
        activation: str = "gelu",
        use_bias: bool = True,
        dropout: float = 0.0,
        kernel_initializer="normal",
        kernel_layout: str = "in_out",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}; got {activation!r}.")
        self.intermediate_dim = intermediate_dim
        self.activation = activation
        self.use_bias = use_bias
        self.dropout = dropout
        self.kernel_initializer = get_initializer(kernel_initializer)
        self.kernel_layout = check_kernel_layout(kernel_layout)

    def build(self, input_shape):
        inner_shape = tuple(input_shape[:-1]) + (self.intermediate_dim,)
        # SwiGLU's gate and up are two equal independent products: they already run side
        # by side, one per core, so row splits (`Linear`) would only add ops.
        pair = self.activation == "swiglu"
        self.up_dense = built_dense(
            self, self.intermediate_dim, "up", input_shape, row_split=not pair
        )
        self.gate_dense = None
        if pair:
            self.gate_dense = built_dense(
                self, self.intermediate_dim, "gate", input_shape, row_split=False
            )
        self.down_dense = built_dense(self, input_shape[-1], "down", inner_shape)
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)

    def call(self, inputs, training=None):
        if self.activation == "swiglu":
            inner = ops.silu(self.gate_dense(inputs)) * self.up_dense(inputs)
        elif self.activation == "gelu":
            inner = ops.gelu(self.up_dense(inputs), approximate=True)
        else:
            inner = ops.relu(self.up_dense(inputs))
        return self.dropout_layer(self.down_dense(inner), training=training)

    def compute_output_spec(self, inputs, training=None):
        return keras.KerasTensor(inputs.shape, self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "intermediate_dim": self.intermediate_dim,
            "activation": self.activation,
            "use_bias": self.use_bias,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "kernel_layout": self.kernel_layout,
        }
