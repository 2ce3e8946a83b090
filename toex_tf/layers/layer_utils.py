"""Small helpers shared by the layers (no public layer here)."""

import keras
from keras import ops

from toex_tf.layers.linear import KERNEL_LAYOUTS, Linear, matmul_out_in


def get_initializer(initializer, stddev: float = 0.02):
    """`"normal"` means normal(stddev) (GPT-2's init); anything else goes to Keras."""
    if initializer == "normal":
        initializer = keras.initializers.RandomNormal(stddev=stddev)
    return keras.initializers.get(initializer)


def check_kernel_layout(kernel_layout: str) -> str:
    if kernel_layout not in KERNEL_LAYOUTS:
        raise ValueError(f"kernel_layout must be one of {KERNEL_LAYOUTS}; got {kernel_layout!r}.")
    return kernel_layout


def built_dense(
    layer, units: int, name: str, input_shape, row_split: bool = True
) -> keras.layers.Layer:
    """A dense sublayer of `layer` (its bias, initializer, dtype policy and kernel layout),
    built now: `keras.layers.Dense`, or `Linear` when `layer.kernel_layout == "out_in"`
    (`row_split` is `Linear`'s)."""
    out_in = getattr(layer, "kernel_layout", "in_out") == "out_in"
    options = {"row_split": row_split} if out_in else {}
    dense = (Linear if out_in else keras.layers.Dense)(
        units,
        use_bias=layer.use_bias,
        kernel_initializer=layer.kernel_initializer,
        dtype=layer.dtype_policy,
        name=name,
        **options,
    )
    dense.build(input_shape)
    return dense


def dense_part(dense, inputs, start: int, stop: int | None):
    """Outputs `[start, stop)` of a `built_dense` sublayer, computing only those.

    Reads just that part of the kernel (rows of a `Linear` kernel, columns of a `Dense`
    one): the frozen exit mode projects keys and values out of a fused `qkv` kernel.
    """
    dtype = dense.compute_dtype
    inputs = ops.cast(inputs, dtype)
    if isinstance(dense, Linear):
        out = matmul_out_in(inputs, ops.cast(dense.kernel[start:stop], dtype))
    else:
        out = ops.matmul(inputs, ops.cast(dense.kernel[:, start:stop], dtype))
    if dense.bias is not None:
        out = out + ops.cast(dense.bias[start:stop], dtype)
    return out
