"""Small helpers shared by the layers (no public layer here)."""

import keras


def get_initializer(initializer, stddev: float = 0.02):
    """`"normal"` means normal(stddev) (GPT-2's init); anything else goes to Keras."""
    if initializer == "normal":
        initializer = keras.initializers.RandomNormal(stddev=stddev)
    return keras.initializers.get(initializer)


def built_dense(layer, units: int, name: str, input_shape) -> keras.layers.Dense:
    """A `Dense` sublayer of `layer` (its bias, initializer and dtype policy), built now."""
    dense = keras.layers.Dense(
        units,
        use_bias=layer.use_bias,
        kernel_initializer=layer.kernel_initializer,
        dtype=layer.dtype_policy,
        name=name,
    )
    dense.build(input_shape)
    return dense
