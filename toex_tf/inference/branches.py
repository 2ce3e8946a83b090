"""Data-dependent branches that are rarely taken, made cheap when they are not.

On TensorFlow, a `tf.function` lowers each conditional to Switch/Merge, and every node of
the branch not taken is still visited at each step (dead-tensor propagation). A branch as
large as a segment of layers then costs every step, taken or not: lazy mode's catch-up
window made never-exiting decoding 5-7% slower than frozen mode on the quickstart model
(2-core CPU, measured 2026-12-04). `rarely_taken(fn)` wraps `fn` as one call that is not
inlined, so the untaken branch is a single node; taking it costs one function call
(about 0.1 ms there). JAX (`lax.switch`) and eager execution run only the branch taken:
there `fn` is returned as it is.
"""

import keras


def rarely_taken(fn):
    """`fn` as a branch that costs one node when not taken (see the module docstring)."""
    if keras.backend.backend() != "tensorflow":
        return fn
    import tensorflow as tf  # noqa: PLC0415 - only on the TensorFlow backend

    if not tf.inside_function():
        return fn
    return tf.function(fn, autograph=False, experimental_attributes={"_noinline": True})
