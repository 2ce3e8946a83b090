"""`tf.distribute` strategies for training (TensorFlow only)."""

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")


def make_strategy(name: str) -> tf.distribute.Strategy:
    """Returns the strategy for `--strategy`.

    - `default`: the no-op default strategy (one device).
    - `mirrored`: synchronous data parallelism over all local GPUs, or all logical
      CPU devices when there is no GPU.
    - `multi_worker`: `MultiWorkerMirroredStrategy`; the cluster comes from `TF_CONFIG`
      (without it, a single-worker cluster).
    """
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")]
        if not devices:
            devices = [d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"strategy must be one of {STRATEGIES}; got {name!r}.")
