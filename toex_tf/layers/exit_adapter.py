"""`ExitAdapter`: a token-local residual map in front of an exit head."""

import keras
from keras import ops

from toex_tf.layers.linear import Linear
from toex_tf.layers.rms_norm import RMSNorm

ADAPTER_KINDS = ("linear", "mlp")


@keras.saving.register_keras_serializable(package="toex_tf")
class ExitAdapter(keras.layers.Layer):
    """Maps an intermediate hidden state towards the final layer's, for an exit head.

    On a pretrained model trained without exits, the shared head cannot read the middle
    layers (the "logit lens" fails there), so an exit trained on the frozen base needs
    capacity of its own (EE-Tuning). The adapter is token-local: it reads one position's
    hidden state only, so decoding needs no cache for it.

    - `"linear"`: `h + h W` (`W` is `(hidden, hidden)`).
    - `"mlp"`: `h + silu(rms_norm(h) W_in) W_out`, `units` wide.

    The output projection starts at zero, so an untrained adapter is the identity and
    the exit starts as the logit lens.

    Args:
        kind: `"linear"` or `"mlp"`.
        units: int, the MLP's width (`"mlp"` only). Defaults to `1024`.
        norm_epsilon: float, the MLP's input RMSNorm epsilon. Defaults to `1e-5`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(..., hidden)`.

    Example:
    >>> adapter = ExitAdapter("mlp", units=64)
    >>> out = adapter(np.ones((2, 3, 16), "float32"))  # == inputs until trained
    """

    def __init__(self, kind: str = "mlp", units: int = 1024, norm_epsilon: float = 1e-5, **kwargs):
        super().__init__(**kwargs)
        if kind not in ADAPTER_KINDS:
            raise ValueError(f"kind must be one of {ADAPTER_KINDS}; got {kind!r}.")
        if isinstance(units, bool) or not isinstance(units, int) or units < 1:
            raise ValueError(f"units must be a positive int; got {units!r}.")
        self.kind = kind
        self.units = units
        self.norm_epsilon = float(norm_epsilon)

    def build(self, input_shape):
        hidden = int(input_shape[-1])
        policy = self.dtype_policy
        if self.kind == "linear":
            self.norm = None
            self.input_dense = None
            self.output_dense = Linear(
                hidden, use_bias=False, kernel_initializer="zeros", dtype=policy, name="linear"
            )
            self.output_dense.build(input_shape)
            return
        self.norm = RMSNorm(self.norm_epsilon, dtype=policy, name="norm")
        self.norm.build(input_shape)
        self.input_dense = Linear(self.units, use_bias=False, dtype=policy, name="input")
        self.input_dense.build(input_shape)
        self.output_dense = Linear(
            hidden, use_bias=False, kernel_initializer="zeros", dtype=policy, name="output"
        )
        self.output_dense.build(tuple(input_shape[:-1]) + (self.units,))

    def call(self, inputs):
        if self.kind == "linear":
            return inputs + self.output_dense(inputs)
        inner = ops.silu(self.input_dense(self.norm(inputs)))
        return inputs + self.output_dense(inner)

    def macs_per_token(self, hidden: int) -> int:
        """Multiply-accumulates per token (for the cost model)."""
        return hidden * hidden if self.kind == "linear" else 2 * hidden * self.units

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape, self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "kind": self.kind,
            "units": self.units,
            "norm_epsilon": self.norm_epsilon,
        }
