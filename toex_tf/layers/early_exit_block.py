"""`EarlyExitBlock`: a transformer block with an optional exit head and confidence gates."""

import keras
from keras import ops

from toex_tf.layers.exit_adapter import ExitAdapter
from toex_tf.layers.learned_exit_gate import LearnedExitGate
from toex_tf.layers.lightweight_output_embedding import LightweightOutputEmbedding
from toex_tf.layers.top_k_confidence_gate import TopKConfidenceGate
from toex_tf.layers.transformer_block import make_norm


def _deserialize(value):
    if isinstance(value, dict):
        return keras.saving.deserialize_keras_object(value)
    return value


@keras.saving.register_keras_serializable(package="toex_tf")
class EarlyExitBlock(keras.layers.Layer):
    """Wraps any transformer block with an optional exit head and gate.

    The exit head is `[adapter →] norm → output embedding`. The output embedding is usually the
    model's shared, tied `LightweightOutputEmbedding` (one instance passed to every
    exit, as in CALM and LayerSkip); `.keras` saving keeps the sharing. The gate turns
    the cheap logits of that embedding into a per-token exit decision, so a confidence
    check never pays for the full vocabulary projection. An optional `LearnedExitGate`
    gives a second confidence, read from the normed hidden state with no vocabulary
    projection at all (`block.learned_gate(block.exit_normed(hidden))`).

    With `layer_dropout > 0`, training skips the whole block for a random share of the
    sequences (the block's output is replaced by its input), which makes later layers
    robust to missing earlier ones, as early exit needs (LayerSkip).

    Args:
        block: the wrapped layer (for example `TransformerBlock`) or its config. It
            maps `(batch, seq, hidden)` to the same shape and accepts the call
            arguments below that are not None.
        output_embedding: `LightweightOutputEmbedding` or None. None means no exit here.
            Defaults to `None`.
        norm_type: str, exit-head norm, `"layer_norm"` or `"rms_norm"`. Defaults to
            `"layer_norm"`.
        norm_epsilon: float. Defaults to `1e-5`.
        gate: `TopKConfidenceGate` (or config) or None; None with an exit head means
            a default `TopKConfidenceGate()`. Defaults to `None`.
        learned_gate: `LearnedExitGate` (or config) or None. Needs an exit head; it is
            built on the hidden size and saved with the block. Defaults to `None`.
        exit_adapter: `ExitAdapter` (or config) or None: a token-local map applied
            before the exit norm (`exit_normed`), for exits on a frozen pretrained
            base. Needs an exit head. Defaults to `None`.
        layer_dropout: float in [0, 1), the training-time probability of skipping the
            block. Defaults to `0.0`.
        seed: int or None, seed of the layer-dropout draws. Defaults to `None`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(batch, seq, hidden)`.
        padding_mask, encoder_outputs, encoder_padding_mask, encoder_kv, cache,
            cache_update_index, routing: passed to the block when not None.
        training: bool.
        return_exit_signals: bool, also return the gate's signals. Defaults to False.
        threshold: optional gate threshold override.
        return_ffn_input: bool, also return the wrapped block's FFN input (a
            `TransformerBlock`'s), what a skip router decides on. Defaults to False.

    Returns:
        Without an exit head: `hidden` (plus `cache` when given). With one:
        `(hidden, exit_logits)`, then a dict of signals (`cheap_logits`, `confidence`,
        `exit`, plus `learned_confidence` with a learned gate) when
        `return_exit_signals`, then the FFN input with `return_ffn_input`, then `cache`
        when given.

    Example:
    >>> embedding = LightweightOutputEmbedding(vocab_size=100, hidden_dim=16, shortlist_size=8)
    >>> block = EarlyExitBlock(TransformerBlock(2, 8, 64), output_embedding=embedding)
    >>> hidden, logits = block(np.zeros((1, 4, 16), "float32"))

    References:
        Elhoushi et al., "LayerSkip: Enabling Early Exit Inference and Self-Speculative
        Decoding", 2024.
    """

    def __init__(
        self,
        block,
        output_embedding=None,
        norm_type: str = "layer_norm",
        norm_epsilon: float = 1e-5,
        gate=None,
        layer_dropout: float = 0.0,
        seed: int | None = None,
        learned_gate=None,
        exit_adapter=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        block = _deserialize(block)
        output_embedding = _deserialize(output_embedding)
        gate = _deserialize(gate)
        learned_gate = _deserialize(learned_gate)
        exit_adapter = _deserialize(exit_adapter)
        if not isinstance(block, keras.layers.Layer):
            raise TypeError(f"block must be a keras Layer; got {type(block).__name__}.")
        if output_embedding is not None and not isinstance(
            output_embedding, LightweightOutputEmbedding
        ):
            raise TypeError(
                "output_embedding must be a LightweightOutputEmbedding or None; got "
                f"{type(output_embedding).__name__}."
            )
        if learned_gate is not None and not isinstance(learned_gate, LearnedExitGate):
            raise TypeError(
                "learned_gate must be a LearnedExitGate or None; got "
                f"{type(learned_gate).__name__}."
            )
        if learned_gate is not None and output_embedding is None:
            raise ValueError(
                "learned_gate needs an exit head: pass output_embedding too, or "
                "learned_gate=None for a block without an exit."
            )
        if exit_adapter is not None and not isinstance(exit_adapter, ExitAdapter):
            raise TypeError(
                f"exit_adapter must be an ExitAdapter or None; got {type(exit_adapter).__name__}."
            )
        if exit_adapter is not None and output_embedding is None:
            raise ValueError("exit_adapter needs an exit head: pass output_embedding too.")
        if not 0.0 <= layer_dropout < 1.0:
            raise ValueError(f"layer_dropout must be in [0, 1); got {layer_dropout}.")
        if output_embedding is not None and gate is None:
            gate = TopKConfidenceGate(dtype=self.dtype_policy, name="gate")
        self.block = block
        self.output_embedding = output_embedding
        self.norm_type = norm_type
        self.norm_epsilon = norm_epsilon
        self.gate = gate if output_embedding is not None else None
        self.learned_gate = learned_gate
        self.exit_adapter = exit_adapter
        self.layer_dropout = float(layer_dropout)
        self.seed = seed

    @property
    def has_exit(self) -> bool:
        return self.output_embedding is not None

    def build(self, input_shape):
        if not self.block.built:  # a deserialized block arrives built
            self.block.build(input_shape)
        self.exit_norm = None
        if self.has_exit:
            self.exit_norm = make_norm(
                self.norm_type, self.norm_epsilon, self.dtype_policy, "exit_norm"
            )
            self.exit_norm.build(input_shape)
            if not self.output_embedding.built:
                self.output_embedding.build()
            if self.learned_gate is not None and not self.learned_gate.built:
                self.learned_gate.build(input_shape)
            if self.exit_adapter is not None and not self.exit_adapter.built:
                self.exit_adapter.build(input_shape)
        self.seed_generator = None
        if self.layer_dropout > 0:
            self.seed_generator = keras.random.SeedGenerator(self.seed, name="layer_dropout")

    def exit_normed(self, hidden):
        """What the exit head reads: `exit_norm(exit_adapter(hidden))` (no adapter: the
        norm alone). Gates and heads all read this."""
        if self.exit_adapter is not None:
            hidden = self.exit_adapter(hidden)
        return self.exit_norm(hidden)

    def exit_logits(self, hidden):
        """Full-vocabulary logits of this exit for `hidden` (run at the exit taken)."""
        return self.output_embedding(self.exit_normed(hidden), mode="logits")

    def exit_signals(self, hidden, threshold=None, normed=None):
        """Gate signals: `cheap_logits`, `confidence` and `exit` from the cheap head, and
        `learned_confidence` from the learned gate when there is one."""
        if normed is None:
            normed = self.exit_normed(hidden)
        cheap_logits = self.output_embedding(normed, mode="cheap_logits")
        confidence, exit_decision = self.gate(cheap_logits, threshold=threshold)
        signals = {"cheap_logits": cheap_logits, "confidence": confidence, "exit": exit_decision}
        if self.learned_gate is not None:
            signals["learned_confidence"] = self.learned_gate(normed)
        return signals

    def call(
        self,
        inputs,
        padding_mask=None,
        encoder_outputs=None,
        encoder_padding_mask=None,
        cache=None,
        cache_update_index=None,
        training=None,
        routing=None,
        return_exit_signals=False,
        threshold=None,
        return_ffn_input=False,
        encoder_kv=None,
    ):
        block_kwargs = {
            name: value
            for name, value in (
                ("padding_mask", padding_mask),
                ("encoder_outputs", encoder_outputs),
                ("encoder_padding_mask", encoder_padding_mask),
                ("cache", cache),
                ("cache_update_index", cache_update_index),
                ("routing", routing),
                ("encoder_kv", encoder_kv),
            )
            if value is not None
        }
        if return_ffn_input:
            block_kwargs["return_ffn_input"] = True
        hidden = self.block(inputs, training=training, **block_kwargs)
        ffn_input = None
        if return_ffn_input and cache is not None:
            hidden, ffn_input, cache = hidden
        elif return_ffn_input:
            hidden, ffn_input = hidden
        elif cache is not None:
            hidden, cache = hidden
        if training and self.seed_generator is not None:
            keep = (
                keras.random.uniform((ops.shape(inputs)[0], 1, 1), seed=self.seed_generator)
                >= self.layer_dropout
            )
            hidden = ops.where(keep, hidden, inputs)
        outputs = [hidden]
        if self.has_exit:
            normed = self.exit_normed(hidden)
            outputs.append(self.output_embedding(normed, mode="logits"))
            if return_exit_signals:
                outputs.append(self.exit_signals(hidden, threshold=threshold, normed=normed))
        elif return_exit_signals:
            raise ValueError(f"{self.name} has no exit head; return_exit_signals needs one.")
        if return_ffn_input:
            outputs.append(ffn_input)
        if cache is not None:
            outputs.append(cache)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def compute_output_spec(
        self, inputs, cache=None, return_exit_signals=False, return_ffn_input=False, **kwargs
    ):
        outputs = [keras.KerasTensor(inputs.shape, self.compute_dtype)]
        if self.has_exit:
            prefix = tuple(inputs.shape[:-1])
            outputs.append(
                keras.KerasTensor(prefix + (self.output_embedding.vocab_size,), self.compute_dtype)
            )
            if return_exit_signals:
                cheap = self.output_embedding.compute_output_spec(outputs[0], mode="cheap_logits")
                signals = {
                    "cheap_logits": cheap,
                    "confidence": keras.KerasTensor(prefix, "float32"),
                    "exit": keras.KerasTensor(prefix, "bool"),
                }
                if self.learned_gate is not None:
                    signals["learned_confidence"] = keras.KerasTensor(prefix, "float32")
                outputs.append(signals)
        if return_ffn_input:
            outputs.append(keras.KerasTensor(inputs.shape, self.compute_dtype))
        if cache is not None:
            outputs.append(keras.KerasTensor(cache.shape, cache.dtype))
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    def get_config(self):
        return {
            **super().get_config(),
            "block": keras.saving.serialize_keras_object(self.block),
            "output_embedding": keras.saving.serialize_keras_object(self.output_embedding),
            "norm_type": self.norm_type,
            "norm_epsilon": self.norm_epsilon,
            "gate": keras.saving.serialize_keras_object(self.gate),
            "layer_dropout": self.layer_dropout,
            "seed": self.seed,
            "learned_gate": keras.saving.serialize_keras_object(self.learned_gate),
            "exit_adapter": keras.saving.serialize_keras_object(self.exit_adapter),
        }
