"""`Linear`: a dense layer whose kernel is stored `(units, input_dim)`, torch's layout."""

import keras
from keras import ops

KERNEL_LAYOUTS = ("in_out", "out_in")


def matmul_out_in(inputs, kernel):
    """`inputs @ kernel.T` for a kernel stored `(out, in)`; any leading dims on `inputs`.

    Batch-1 decoding reads every weight once per token, so the kernel's memory order
    decides the speed. On TensorFlow's CPU (oneDNN) kernels, measured on 2 cores with the
    TinyLlama shapes: the `(out, in)` layout read as a transposed operand (GEMV) made a
    decode step 11% faster than Keras `Dense`'s `(in, out)`, and for several rows (a
    prefill) `(kernel @ inputs.T).T` was 1.6x faster than the transposed-operand form.
    """
    width = inputs.shape[-1]
    rows = ops.reshape(inputs, (-1, width))
    if rows.shape[0] == 1:  # static single row: one decode token
        out = ops.einsum("ij,kj->ik", rows, kernel)
    else:
        out = ops.transpose(ops.matmul(kernel, ops.transpose(rows)))
    return ops.reshape(out, tuple(ops.shape(inputs)[:-1]) + (kernel.shape[0],))


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
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = int(units)
        self.use_bias = use_bias
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
        out = matmul_out_in(inputs, ops.cast(self.kernel, inputs.dtype))
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
        }
