"""Model builders. Each returns a Functional `keras.Model`; baselines are exits off."""

from toex_tf.models.gpt import EarlyExitGPT, add_learned_gates, build_gpt, with_exit_signals
from toex_tf.models.llama import HierarchicalLlama, build_llama
from toex_tf.models.transformer import EarlyExitTransformer, build_transformer

__all__ = [
    "EarlyExitGPT",
    "EarlyExitTransformer",
    "HierarchicalLlama",
    "add_learned_gates",
    "build_gpt",
    "build_llama",
    "build_transformer",
    "with_exit_signals",
]
