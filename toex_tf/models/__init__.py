"""Model builders. Each returns a Functional `keras.Model`; baselines are exits off."""

from toex_tf.models.gpt import EarlyExitGPT, build_gpt, with_exit_signals

__all__ = ["EarlyExitGPT", "build_gpt", "with_exit_signals"]
