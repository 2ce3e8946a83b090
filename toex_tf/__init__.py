"""toex_tf: adaptive-depth inference (early exit, FFN skip routing) for Keras 3 LMs.

>>> import toex_tf
>>> lm = toex_tf.load("runs/quickstart")  # a run directory, a checkpoint or a handle
>>> lm.generate("Return the", max_new_tokens=16, mode="lazy", threshold=0.1).text

`import toex_tf`, `toex_tf.layers` and `toex_tf.models` need Keras only, not TensorFlow,
so the layers also run under `KERAS_BACKEND=jax`. `load` and `AdaptiveLM` load on first
use (`toex_tf.api`).
"""

__version__ = "0.1.0"

_API = ("AdaptiveLM", "Generation", "load")
__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        from toex_tf import api  # noqa: PLC0415 - keeps `import toex_tf` light

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
