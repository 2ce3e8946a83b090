"""`RMSNorm`: root-mean-square layer normalisation (Llama)."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="toex_tf")
class RMSNorm(keras.layers.Layer):
    """`x / sqrt(mean(x^2) + epsilon) * scale`, computed in float32.

    Follows Hugging Face Llama exactly: normalise in float32, cast back to the input
    dtype, then multiply by the scale. The epsilon comes from the checkpoint config
    (`rms_norm_eps`), never a hard-coded default (DESIGN.md §4).

    Args:
        epsilon: float. Defaults to `1e-6`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(..., hidden)`.

    Example:
    >>> norm = RMSNorm(epsilon=1e-5)
    >>> out = norm(np.ones((2, 3, 8), "float32"))
    """

    def __init__(self, epsilon: float = 1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        x = x * ops.rsqrt(ops.mean(ops.square(x), axis=-1, keepdims=True) + self.epsilon)
        return ops.cast(x, inputs.dtype) * ops.cast(self.scale, inputs.dtype)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
