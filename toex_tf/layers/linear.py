"""`Linear`: a dense layer whose kernel is stored `(units, input_dim)`, torch's layout."""

import keras
from keras import ops

KERNEL_LAYOUTS = ("in_out", "out_in")

# Products with fewer output rows than this per part are never split.
MIN_ROWS_PER_PART = 256

_row_splits = 1


def set_row_splits(parts: int) -> None:
    """Splits every later-traced `(out, in)` product into `parts` independent products.

    Each part computes a contiguous block of output rows (the same dot products, so the
    same values) and the blocks are concatenated. Independent ops are what TensorFlow's
    inter-op scheduler runs in parallel: with one intra-op thread per op and `parts`
    inter-op threads, every core streams its own share of the weights
    (`toex_tf.inference.tf_threads.use_core_parallel_decoding` sets all three). With the
    default threading (each op already multi-threaded) splitting only adds overhead, so
    the default is 1. Applies to graphs traced after the call; an exported SavedModel
    keeps the splits it was traced with.

    Args:
        parts: int >= 1.
    """
    global _row_splits
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"row splits must be an int >= 1; got {parts!r}.")
    _row_splits = parts


def get_row_splits() -> int:
    """The current `set_row_splits` value (1: products are not split)."""
    return _row_splits


def matmul_out_in(inputs, kernel, split: bool = True):
    """`inputs @ kernel.T` for a kernel stored `(out, in)`; any leading dims on `inputs`.

    Batch-1 decoding reads every weight once per token, so the kernel's memory order
    decides the speed. On TensorFlow's CPU (oneDNN) kernels, measured on 2 cores with the
    TinyLlama shapes: the `(out, in)` layout read as a transposed operand (GEMV) made a
    decode step 11% faster than Keras `Dense`'s `(in, out)`, and for several rows (a
    prefill) `(kernel @ inputs.T).T` was 1.6x faster than the transposed-operand form.

    With `split` and `set_row_splits(n)`, n > 1, the product runs as n row blocks
    (kernels of fewer than `n * MIN_ROWS_PER_PART` rows stay whole).
    """
    width = inputs.shape[-1]
    rows = ops.reshape(inputs, (-1, width))
    units = kernel.shape[0]
    parts = _row_splits if split and units >= _row_splits * MIN_ROWS_PER_PART else 1
    if parts == 1:
        out = _rows_times(rows, kernel)
    else:
        bounds = [units * part // parts for part in range(parts + 1)]
        blocks = [_rows_times(rows, kernel[a:b]) for a, b in zip(bounds, bounds[1:])]
        out = ops.concatenate(blocks, axis=1)
    return ops.reshape(out, tuple(ops.shape(inputs)[:-1]) + (units,))


def _rows_times(rows, kernel):
    """`rows (n, in) @ kernel.T` for a kernel `(out, in)`, in the faster form for `n`."""
    if rows.shape[0] == 1:  # static single row: one decode token
        return ops.einsum("ij,kj->ik", rows, kernel)
    return ops.transpose(ops.matmul(kernel, ops.transpose(rows)))


@keras.saving.register_keras_serializable(package="toex_tf")
class Linear(keras.layers.Layer):
    """`inputs @ kernel.T + bias` with the kernel stored `(units, input_dim)`.

    Same maths as `keras.layers.Dense`; only the kernel's layout differs: it is the one
    of `torch.nn.Linear` and of Hugging Face checkpoints, and the faster one for batch-1
    decoding with TensorFlow on CPU (`matmul_out_in`). (XLA on CPU prefers `Dense`'s
    layout: with `jit_compile=True` it transposes this kernel at every step.)

    Args:
        units: int, output width.
        use_bias: bool, default True.
        kernel_initializer: initializer, default `"glorot_uniform"`. Its fan-in/fan-out
            are computed for the `(in, out)` shape, so an initializer draws the same
            distribution as for `Dense`.
        bias_initializer: initializer, default `"zeros"`.
        row_split: bool, default True: the product may run as `set_row_splits` row
            blocks. False for products that already run side by side with an equal one
            (SwiGLU's gate and up), which keep a core each.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(..., input_dim)`.

    Example:
    >>> layer = Linear(8)
    >>> out = layer(np.zeros((2, 3, 4), "float32"))  # kernel shape (8, 4)
    """

    def __init__(
        self,
        units: int,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        row_split: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = int(units)
        self.use_bias = use_bias
        self.row_split = bool(row_split)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        input_dim = input_shape[-1]
        initializer = self.kernel_initializer

        def transposed_init(shape, dtype=None):
            return ops.transpose(initializer((shape[1], shape[0]), dtype=dtype))

        self.kernel = self.add_weight(
            name="kernel", shape=(self.units, input_dim), initializer=transposed_init
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=(self.units,), initializer=self.bias_initializer
            )

    def call(self, inputs):
        out = matmul_out_in(inputs, ops.cast(self.kernel, inputs.dtype), split=self.row_split)
        if self.bias is not None:
            out = out + ops.cast(self.bias, out.dtype)
        return out

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(tuple(inputs.shape[:-1]) + (self.units,), self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "row_split": self.row_split,
        }
