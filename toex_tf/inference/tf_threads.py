"""TensorFlow-only: core-parallel threading for batch-1 decoding on CPU.

A batch-1 decode step is a chain of matrix-vector products that stream the weights
from memory. TensorFlow's default CPU threading runs each product on the intra-op pool,
and its oneDNN GEMV kernel left bandwidth unused on a 2-core machine (2048x2048 fp32:
about 24 GB/s against torch/MKL's 30). Core-parallel decoding instead gives each op one
thread, runs independent ops side by side on `cores` inter-op threads, and splits every
large product into `cores` row blocks (`toex_tf.layers.linear.set_row_splits`), so each
core streams its own share of every weight matrix.

Measured on the TinyLlama-1.1B config (2 cores, fp32, `benchmarks/llama_speed.py
--core_parallel`): see the README's Llama section for the figures. With the default
threading, splitting only adds ops, so nothing here is on unless asked for. It is meant
for decoding: training under it runs each op on one thread, and the gradient of a split
kernel is built from full-size pieces.

TensorFlow fixes its thread pools when it runs its first op, so call
`use_core_parallel_decoding` first thing, or start Python with
`TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=<cores>` in the environment (the call
then only sets the row splits).
"""

import os

from toex_tf.layers.linear import set_row_splits


def use_core_parallel_decoding(cores: int | None = None) -> int:
    """One intra-op thread, `cores` inter-op threads and `cores` row splits.

    Args:
        cores: int >= 1, default the cores this process may run on.

    Returns:
        The number of row splits set.

    Raises:
        ValueError: `cores` is not an int >= 1.
        RuntimeError: TensorFlow already runs with other thread pools (it has executed an
            op and the environment does not hold the same setting).
    """
    import tensorflow as tf  # noqa: PLC0415 - TensorFlow-only module, loaded on use

    if cores is None:  # the cores this process may use (affinity, containers)
        usable = getattr(os, "sched_getaffinity", None)
        cores = len(usable(0)) if usable else os.cpu_count()
    if isinstance(cores, bool) or not isinstance(cores, int) or cores < 1:
        raise ValueError(f"cores must be an int >= 1; got {cores!r}.")
    threading = tf.config.threading
    try:  # setting the values the pools already have is accepted after start-up
        threading.set_intra_op_parallelism_threads(1)
        threading.set_inter_op_parallelism_threads(cores)
    except RuntimeError as error:
        environment = (
            os.environ.get("TF_NUM_INTRAOP_THREADS"),
            os.environ.get("TF_NUM_INTEROP_THREADS"),
        )
        if environment != ("1", str(cores)):
            raise RuntimeError(
                "use_core_parallel_decoding must run before TensorFlow executes its first "
                "op (its thread pools are fixed then); call it right after the imports, or "
                f"start Python with TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS={cores}."
            ) from error
    set_row_splits(cores)
    return cores
