"""`PositionEmbedding`: learned absolute position embeddings (GPT-2)."""

import keras
from keras import ops

from toex_tf.layers.layer_utils import get_initializer


@keras.saving.register_keras_serializable(package="toex_tf")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned vector for each absolute position to `inputs`.

    Args:
        max_length: int, the longest sequence the model accepts.
        initializer: initializer. Defaults to normal(stddev=0.01).
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(batch, seq, hidden)`.
        start_index: int or scalar tensor, position of `inputs[:, 0]` (for decoding).
        position_ids: optional int `(batch, seq)`, each token's own position (a batch of
            left-padded prompts: a row's first real token is position 0). Ids are
            clipped to `[0, max_length)`, so pad slots with negative ids stay in range.
            Overrides `start_index`.

    Returns:
        `inputs` plus the embeddings of positions `start_index .. start_index + seq - 1`
        (or of `position_ids`).

    Example:
    >>> positions = PositionEmbedding(max_length=128)
    >>> out = positions(np.zeros((2, 5, 16), "float32"))
    """

    def __init__(self, max_length: int, initializer="normal", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be a positive int; got {max_length!r}.")
        self.max_length = max_length
        self.initializer = get_initializer(initializer, stddev=0.01)

    def build(self, input_shape):
        seq = input_shape[1] if len(input_shape) > 1 else None
        if seq is not None and seq > self.max_length:
            raise ValueError(f"sequence length {seq} exceeds max_length={self.max_length}.")
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=(self.max_length, input_shape[-1]),
            initializer=self.initializer,
        )

    def call(self, inputs, start_index=0, position_ids=None):
        if position_ids is not None:
            ids = ops.clip(ops.cast(position_ids, "int32"), 0, self.max_length - 1)
            # JAX cannot gather from a Keras Variable directly.
            table = ops.convert_to_tensor(self.embeddings)
            return inputs + ops.cast(ops.take(table, ids, axis=0), inputs.dtype)
        seq = inputs.shape[1]
        if isinstance(seq, int) and isinstance(start_index, int):
            if start_index + seq > self.max_length:
                raise ValueError(
                    f"positions {start_index}..{start_index + seq - 1} exceed "
                    f"max_length={self.max_length}."
                )
        seq = ops.shape(inputs)[1]
        if not isinstance(start_index, int):
            # A traced start: clip each position rather than slice, so a window that runs
            # past the table (a speculative draft at the end of the cache, whose tokens
            # are discarded) keeps its valid positions exact instead of failing.
            ids = ops.cast(start_index, "int32") + ops.arange(seq, dtype="int32")
            return self.call(inputs, position_ids=ids[None, :])
        positions = ops.slice(
            ops.convert_to_tensor(self.embeddings),  # JAX cannot slice a Keras Variable
            (ops.cast(start_index, "int32"), 0),
            (seq, ops.shape(inputs)[-1]),
        )
        return inputs + ops.cast(positions, inputs.dtype)[None]

    def compute_output_spec(self, inputs, start_index=0, position_ids=None):
        return keras.KerasTensor(inputs.shape, inputs.dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "max_length": self.max_length,
            "initializer": keras.initializers.serialize(self.initializer),
        }
