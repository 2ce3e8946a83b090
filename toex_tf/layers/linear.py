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
        lora_rank: int or None, default None: builds the layer with LoRA enabled
            (`enable_lora`); set by `get_config` so a saved LoRA layer reloads as one.
        lora_alpha: float or None, default None (the rank): the LoRA scale numerator.
        **kwargs: base `keras.layers.Layer` arguments.

    LoRA follows `keras.layers.Dense.enable_lora`: the same weight names and shapes
    (`lora_kernel_a (input_dim, rank)`, `lora_kernel_b (rank, units)`, float32), the
    kernel frozen, and the output `inputs @ kernel.T + (alpha / rank) * inputs @ a @ b`.
    `merge_lora` folds the product into the kernel for serving.

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
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = int(units)
        self.use_bias = use_bias
        self.row_split = bool(row_split)
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.lora_enabled = False
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
        if self.lora_rank:
            self.built = True  # as `Dense.build` does, for `enable_lora`'s check
            self.enable_lora(self.lora_rank, self.lora_alpha)

    def enable_lora(self, rank: int, lora_alpha: float | None = None) -> None:
        """Freezes the kernel and adds a trainable rank-`rank` update (`Dense`'s API).

        `lora_kernel_a` starts He-uniform and `lora_kernel_b` at zero, so the layer's
        output is unchanged until it trains (Hu et al., "LoRA", 2021).
        """
        if not self.built:
            raise ValueError("Cannot enable lora on a layer that isn't yet built.")
        if self.lora_enabled:
            raise ValueError("lora is already enabled. This can only be done once per layer.")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"lora rank must be an int >= 1; got {rank!r}.")
        units, input_dim = self.kernel.shape
        self._tracker.unlock()
        self.lora_kernel_a = self.add_weight(
            name="lora_kernel_a",
            shape=(input_dim, rank),
            initializer="he_uniform",
            dtype="float32",
        )
        self.lora_kernel_b = self.add_weight(
            name="lora_kernel_b", shape=(rank, units), initializer="zeros", dtype="float32"
        )
        self._tracker.lock()
        self.kernel.trainable = False
        self.lora_enabled = True
        self.lora_rank = rank
        self.lora_alpha = float(lora_alpha if lora_alpha is not None else rank)

    def merge_lora(self) -> None:
        """Folds the LoRA update into the kernel and drops it: the same outputs, the
        cost of the plain layer. The kernel stays frozen."""
        if not self.lora_enabled:
            raise ValueError(f"{self.name} has no LoRA update to merge.")
        update = (self.lora_alpha / self.lora_rank) * ops.transpose(
            ops.matmul(self.lora_kernel_a, self.lora_kernel_b)
        )
        self.kernel.assign(ops.cast(ops.cast(self.kernel, "float32") + update, self.kernel.dtype))
        self._tracker.unlock()
        del self.lora_kernel_a, self.lora_kernel_b
        self._tracker.lock()
        self.lora_enabled = False
        self.lora_rank = self.lora_alpha = None

    def call(self, inputs):
        out = matmul_out_in(inputs, ops.cast(self.kernel, inputs.dtype), split=self.row_split)
        if self.lora_enabled:
            low = ops.matmul(
                ops.matmul(inputs, ops.cast(self.lora_kernel_a, inputs.dtype)),
                ops.cast(self.lora_kernel_b, inputs.dtype),
            )
            out = out + ops.cast(self.lora_alpha / self.lora_rank, out.dtype) * low
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
            "lora_rank": self.lora_rank if self.lora_enabled else None,
            "lora_alpha": self.lora_alpha if self.lora_enabled else None,
        }
