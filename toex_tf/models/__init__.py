"""Model builders. Each returns a Functional `keras.Model`; baselines are exits off."""

from toex_tf.models.gpt import EarlyExitGPT, add_learned_gates, build_gpt, with_exit_signals
from toex_tf.models.llama import HierarchicalLlama, build_llama

__all__ = [
    "EarlyExitGPT",
    "HierarchicalLlama",
    "add_learned_gates",
    "build_gpt",
    "build_llama",
    "with_exit_signals",
]
