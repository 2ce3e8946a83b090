"""Model builders. Each returns a Functional `keras.Model`; baselines are exits off."""

from toex_tf.models.gpt import EarlyExitGPT, add_learned_gates, build_gpt, with_exit_signals

__all__ = ["EarlyExitGPT", "add_learned_gates", "build_gpt", "with_exit_signals"]
