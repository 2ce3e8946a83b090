"""Keras 3 layers of toex_tf (keras.ops only: they run on TensorFlow and on JAX)."""

from toex_tf.layers.causal_self_attention import CausalSelfAttention
from toex_tf.layers.cross_attention import CrossAttention
from toex_tf.layers.early_exit_block import EarlyExitBlock
from toex_tf.layers.encoder_block import EncoderBlock
from toex_tf.layers.exit_adapter import ADAPTER_KINDS, ExitAdapter
from toex_tf.layers.feed_forward import FeedForward
from toex_tf.layers.learned_exit_gate import GumbelExitGate, LearnedExitGate
from toex_tf.layers.lightweight_output_embedding import LightweightOutputEmbedding
from toex_tf.layers.linear import Linear
from toex_tf.layers.position_embedding import PositionEmbedding
from toex_tf.layers.rms_norm import RMSNorm
from toex_tf.layers.rotary_embedding import RotaryEmbedding
from toex_tf.layers.skip_router import SkipRouter
from toex_tf.layers.top_k_confidence_gate import CRITERIA, TopKConfidenceGate
from toex_tf.layers.transformer_block import TransformerBlock

__all__ = [
    "ADAPTER_KINDS",
    "CRITERIA",
    "CausalSelfAttention",
    "CrossAttention",
    "EarlyExitBlock",
    "EncoderBlock",
    "ExitAdapter",
    "FeedForward",
    "GumbelExitGate",
    "LearnedExitGate",
    "LightweightOutputEmbedding",
    "Linear",
    "PositionEmbedding",
    "RMSNorm",
    "RotaryEmbedding",
    "SkipRouter",
    "TopKConfidenceGate",
    "TransformerBlock",
]
