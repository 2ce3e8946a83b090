"""Compiling the decode loops: `tf.function` on TensorFlow, `jax.jit` on JAX.

The one compile helper of the package (`compile_function`); the backend is Keras's
(`keras.backend.backend()`), and neither TensorFlow nor JAX is imported at module level.
"""

import functools
from collections.abc import Callable

import keras
import numpy as np

from toex_tf.inference.loop import generate
from toex_tf.inference.speculative import generate_speculative


def compile_function(fn: Callable, jit_compile: bool = False, numpy_outputs: bool = False):
    """`fn` compiled for the Keras backend.

    Args:
        fn: a function of tensors written in `keras.ops` (a decode loop).
        jit_compile: bool, TensorFlow only: compile the graph with XLA as well (on a
            2-core CPU it ran the quickstart model's full-depth step about 6x faster
            than the plain graph, but each data-dependent branch costs more there).
            JAX always uses XLA. Defaults to `False`.
        numpy_outputs: bool, return NumPy arrays, so a call is synchronous (timing).
            Defaults to `False`.

    Returns:
        The compiled callable; other backends get `fn` itself.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax  # noqa: PLC0415 - only on the JAX backend

        run = jax.jit(fn)
        if numpy_outputs:
            return lambda *args: keras.tree.map_structure(np.asarray, run(*args))
        return run
    if backend != "tensorflow":
        return fn
    import tensorflow as tf  # noqa: PLC0415 - keeps the package importable without TF

    # The loops use ops.while_loop / ops.cond explicitly: nothing for AutoGraph to convert
    # (and it cannot parse closures; it would warn on every trace).
    run = tf.function(fn, jit_compile=jit_compile, autograph=False)
    if numpy_outputs:
        return lambda *args: keras.tree.map_structure(np.asarray, run(*args))
    return run


def compiled_generate(
    adapter,
    max_new_tokens: int,
    policy=None,
    jit_compile: bool = False,
    numpy_outputs: bool = False,
    **options,
):
    """A compiled `(prompt[, padding_mask]) -> generate(...)` for fixed settings.

    The whole loop (prefill, `while_loop` over tokens, segment `cond`s) is one program:
    no Python runs per token. It retraces per prompt shape.

    Args:
        adapter: the model (`DecoderAdapter`).
        max_new_tokens: int > 0.
        policy: the `ExitPolicy` (default: full depth).
        jit_compile: TensorFlow: compile with XLA as well.
        numpy_outputs: return NumPy arrays.
        **options: the other arguments of `generate` (`sampling`, `temperature`,
            `top_k`, `top_p`, `stop_token_ids`, `seed`, `return_state`).
    """
    run = functools.partial(
        generate, adapter, max_new_tokens=max_new_tokens, policy=policy, **options
    )

    def call(prompt, padding_mask=None):
        return run(prompt, padding_mask=padding_mask)

    return compile_function(call, jit_compile, numpy_outputs)


def compiled_speculative(
    adapter,
    max_new_tokens: int,
    draft_layer: int,
    draft_length: int = 4,
    jit_compile: bool = False,
    numpy_outputs: bool = False,
    return_state: bool = False,
):
    """A compiled `(prompt[, padding_mask]) -> generate_speculative(...)` (LayerSkip)."""

    def call(prompt, padding_mask=None):
        return generate_speculative(
            adapter,
            prompt,
            max_new_tokens,
            draft_layer,
            draft_length,
            return_state=return_state,
            padding_mask=padding_mask,
        )

    return compile_function(call, jit_compile, numpy_outputs)
