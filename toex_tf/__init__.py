"""toex_tf: adaptive-depth inference (early exit, FFN skip routing) for Keras 3 LMs.

`import toex_tf`, `toex_tf.layers` and `toex_tf.models` need Keras only, not TensorFlow,
so the layers also run under `KERAS_BACKEND=jax`.
"""

__version__ = "0.1.0"
