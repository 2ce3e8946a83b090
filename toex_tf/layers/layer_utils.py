"""Small helpers shared by the layers (no public layer here)."""

import keras

from toex_tf.layers.linear import KERNEL_LAYOUTS, Linear


def get_initializer(initializer, stddev: float = 0.02):
    """`"normal"` means normal(stddev) (GPT-2's init); anything else goes to Keras."""
    if initializer == "normal":
        initializer = keras.initializers.RandomNormal(stddev=stddev)
    return keras.initializers.get(initializer)


def check_kernel_layout(kernel_layout: str) -> str:
    if kernel_layout not in KERNEL_LAYOUTS:
        raise ValueError(f"kernel_layout must be one of {KERNEL_LAYOUTS}; got {kernel_layout!r}.")
    return kernel_layout


def built_dense(layer, units: int, name: str, input_shape) -> keras.layers.Layer:
    """A dense sublayer of `layer` (its bias, initializer, dtype policy and kernel layout),
    built now: `keras.layers.Dense`, or `Linear` when `layer.kernel_layout == "out_in"`."""
    out_in = getattr(layer, "kernel_layout", "in_out") == "out_in"
    dense = (Linear if out_in else keras.layers.Dense)(
        units,
        use_bias=layer.use_bias,
        kernel_initializer=layer.kernel_initializer,
        dtype=layer.dtype_policy,
        name=name,
    )
    dense.build(input_shape)
    return dense
