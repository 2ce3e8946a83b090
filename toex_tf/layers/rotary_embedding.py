"""`RotaryEmbedding`: rotary position embedding (RoPE), in the Hugging Face Llama layout."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="toex_tf")
class RotaryEmbedding(keras.layers.Layer):
    """Rotates query/key vectors by their absolute position (no weights).

    Uses the "rotate half" layout of Hugging Face Llama (the two halves of each head,
    not interleaved pairs), so imported checkpoints need no permutation of q/k rows.

    Args:
        theta: float, the RoPE base wavelength. Defaults to `10000.0`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(batch, seq, heads, head_dim)`, `head_dim` even.
        start_index: int or scalar tensor, absolute position of `inputs[:, 0]`.

    Example:
    >>> rope = RotaryEmbedding(theta=10000.0)
    >>> rotated = rope(np.ones((1, 4, 2, 8), "float32"), start_index=3)

    References:
        Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021.
    """

    def __init__(self, theta: float = 10000.0, **kwargs):
        super().__init__(**kwargs)
        if theta <= 0:
            raise ValueError(f"theta must be > 0; got {theta}.")
        self.theta = float(theta)

    def call(self, inputs, start_index=0):
        head_dim = inputs.shape[-1]
        if head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim; got {head_dim}.")
        seq_len = ops.shape(inputs)[1]
        positions = ops.cast(ops.arange(seq_len), "float32") + ops.cast(start_index, "float32")
        exponents = ops.arange(0, head_dim, 2, dtype="float32") / float(head_dim)
        inverse_frequencies = 1.0 / ops.power(self.theta, exponents)
        angles = positions[:, None] * inverse_frequencies[None, :]
        angles = ops.concatenate([angles, angles], axis=-1)[None, :, None, :]
        x = ops.cast(inputs, "float32")
        half = head_dim // 2
        rotated = ops.concatenate([-x[..., half:], x[..., :half]], axis=-1)
        out = x * ops.cos(angles) + rotated * ops.sin(angles)
        return ops.cast(out, inputs.dtype)

    def compute_output_spec(self, inputs, start_index=0):
        return keras.KerasTensor(inputs.shape, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "theta": self.theta}
