"""`EarlyExitGPT`: a GPT-2-style decoder with exits, as a Functional `keras.Model`."""

import keras

from toex_tf.config import GPTConfig, gpt_preset
from toex_tf.layers import (
    EarlyExitBlock,
    LearnedExitGate,
    LightweightOutputEmbedding,
    PositionEmbedding,
    TopKConfidenceGate,
    TransformerBlock,
)
from toex_tf.models.base import AdaptiveModel


@keras.saving.register_keras_serializable(package="toex_tf")
class EarlyExitGPT(AdaptiveModel, keras.Model):
    """GPT-2-style decoder whose blocks may carry exit heads.

    A Functional model (KerasHub's backbone pattern): the constructor lays out the graph
    from plain arguments, `get_config` returns those arguments, and `.keras` files
    rebuild it with the output embedding shared across exits.

    Outputs (the `AdaptiveModel` contract): a dict with `"logits"`, the final layer's
    `(batch, seq, vocab)`, and `"exit_logits"`, a list of logits `(batch, seq, vocab)`,
    one per exit layer in ascending order; the last is the final layer. With
    `exit_signals=True` it also has `"cheap_logits"`, the cheap head of
    `LightweightOutputEmbedding` at each exit, used by the exit evaluation.

    The baseline is the same model with `exit_layers="none"`. With `learned_gates`,
    every exit but the final one also carries a `LearnedExitGate` (weights only; it adds
    no output). `add_learned_gates` gives a trained model gates after the fact.

    Args:
        vocab_size, max_length, hidden_dim, num_layers, num_heads, intermediate_dim,
        dropout, exit_layers, output_embedding_mode, shortlist_size, low_rank,
        layer_dropout, capacity, gate_criterion, gate_threshold, norm_epsilon,
        learned_gates, learned_gate_units: the fields of `toex_tf.config.GPTConfig`.
            `layer_dropout` is the rate at the last layer; layer `l` of `L` uses
            `layer_dropout * l / L` (LayerSkip).
        exit_signals: bool, also output the cheap-head logits. Defaults to `False`.
        seed: int, seed of the layer-dropout draws. Defaults to `0`.
        **kwargs: base `keras.Model` arguments (`name`, ...).

    Example:
    >>> model = EarlyExitGPT(**gpt_preset("tiny").to_dict())
    >>> exit_logits = model(np.zeros((1, 8), "int32"))["exit_logits"]  # one per exit

    References:
        Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2).
    """

    def __init__(
        self,
        vocab_size: int,
        max_length: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        intermediate_dim: int | None = None,
        dropout: float = 0.0,
        exit_layers="all",
        output_embedding_mode: str = "shortlist",
        shortlist_size: int = 256,
        low_rank: int = 64,
        layer_dropout: float = 0.0,
        capacity: float = 1.0,
        gate_criterion: str = "margin",
        gate_threshold: float = 0.9,
        norm_epsilon: float = 1e-5,
        learned_gates: bool = False,
        learned_gate_units: int = 0,
        exit_signals: bool = False,
        seed: int = 0,
        **kwargs,
    ):
        config = GPTConfig(
            vocab_size=vocab_size,
            max_length=max_length,
            hidden_dim=hidden_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_dim=intermediate_dim,
            dropout=dropout,
            exit_layers=exit_layers,
            output_embedding_mode=output_embedding_mode,
            shortlist_size=shortlist_size,
            low_rank=low_rank,
            layer_dropout=layer_dropout,
            capacity=capacity,
            gate_criterion=gate_criterion,
            gate_threshold=gate_threshold,
            norm_epsilon=norm_epsilon,
            learned_gates=learned_gates,
            learned_gate_units=learned_gate_units,
        )
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        embedding = LightweightOutputEmbedding(
            vocab_size=vocab_size,
            hidden_dim=hidden_dim,
            mode=output_embedding_mode,
            shortlist_size=config.shortlist_size,
            rank=low_rank,
            name="token_embedding",
        )
        x = embedding(token_ids, mode="embed")
        x = PositionEmbedding(max_length, name="position_embedding")(x)
        x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
        exit_logits, cheap_logits = [], []
        for layer in range(1, num_layers + 1):
            has_exit = layer in config.exit_layers
            # The final exit is always taken, so it needs no learned gate.
            learned_gate = None
            if learned_gates and has_exit and layer < num_layers:
                learned_gate = LearnedExitGate(learned_gate_units, name="learned_gate")
            block = EarlyExitBlock(
                TransformerBlock(
                    num_heads=num_heads,
                    head_dim=hidden_dim // num_heads,
                    intermediate_dim=intermediate_dim or 4 * hidden_dim,
                    norm_epsilon=norm_epsilon,
                    dropout=dropout,
                    capacity=capacity,
                    name="transformer",
                ),
                output_embedding=embedding if has_exit else None,
                norm_epsilon=norm_epsilon,
                gate=TopKConfidenceGate(gate_criterion, gate_threshold, name="gate")
                if has_exit
                else None,
                layer_dropout=layer_dropout * layer / num_layers,
                seed=seed + layer,
                learned_gate=learned_gate,
                name=f"block_{layer}",
            )
            if not has_exit:
                x = block(x)
                continue
            if exit_signals:
                x, logits, signals = block(x, return_exit_signals=True)
                cheap_logits.append(signals["cheap_logits"])
            else:
                x, logits = block(x)
            exit_logits.append(logits)
        # A dict, so that a single exit (the baseline) is still a list of one.
        outputs = {"logits": exit_logits[-1], "exit_logits": exit_logits}
        if exit_signals:
            outputs["cheap_logits"] = cheap_logits
        super().__init__(inputs=token_ids, outputs=outputs, **kwargs)
        self.config = config
        self.exit_signals = exit_signals
        self.seed = seed

    def embed_tokens(self, token_ids, start_index=0, position_ids=None):
        """Token plus learned position embeddings (`AdaptiveModel`)."""
        embedded = self.token_embedding(token_ids, mode="embed")
        positions = self.get_layer("position_embedding")
        return positions(embedded, start_index=start_index, position_ids=position_ids)

    def get_config(self):
        config = self.config.to_dict()
        config["exit_layers"] = list(config["exit_layers"])
        return {
            "name": self.name,
            "trainable": self.trainable,
            **config,
            "exit_signals": self.exit_signals,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_gpt(config: GPTConfig | str, exit_signals: bool = False, **overrides) -> EarlyExitGPT:
    """Builds an `EarlyExitGPT` from a `GPTConfig` or a preset name plus overrides."""
    if isinstance(config, str):
        config = gpt_preset(config, **overrides)
    elif overrides:
        config = GPTConfig(**{**config.to_dict(), **overrides})
    return EarlyExitGPT(**config.to_dict(), exit_signals=exit_signals)


def with_exit_signals(model: EarlyExitGPT) -> EarlyExitGPT:
    """A copy of `model` (same weights) that also outputs the cheap-head logits."""
    signal_model = EarlyExitGPT.from_config({**model.get_config(), "exit_signals": True})
    signal_model.set_weights(model.get_weights())
    return signal_model


def add_learned_gates(model: EarlyExitGPT, hidden_units: int = 0) -> EarlyExitGPT:
    """A copy of `model` with a `LearnedExitGate` on every non-final exit, same weights.

    Keras 3 adds no state to a built layer, so the model is rebuilt from its config with
    `learned_gates=True` and every variable of `model` is copied over by path, with a
    shape check. The new gates start untrained (confidence 0.5 everywhere); train them
    with `toex_tf.training.gate_training.fit_learned_gates`.

    Args:
        model: a trained `EarlyExitGPT` without learned gates.
        hidden_units: int, the gates' hidden width; `0` is a linear probe. Defaults to
            `0`.

    Returns:
        A new `EarlyExitGPT` whose outputs equal `model`'s exactly.
    """
    if not isinstance(model, EarlyExitGPT):
        raise TypeError(f"model must be an EarlyExitGPT; got {type(model).__name__}.")
    if model.config.learned_gates:
        raise ValueError(f"model {model.name!r} already has learned gates.")
    if len(model.exit_layers) < 2:
        raise ValueError(
            f"model {model.name!r} has only the final exit (exit_layers="
            f"{list(model.exit_layers)}); learned gates go on the earlier exits."
        )
    gated = EarlyExitGPT.from_config(
        {**model.get_config(), "learned_gates": True, "learned_gate_units": hidden_units}
    )
    source, target = _weights_by_path(model), _weights_by_path(gated)
    missing = sorted(set(source) - set(target))
    if missing:
        raise ValueError(f"weights {missing} of {model.name!r} have no place in the gated model.")
    for path, variable in target.items():
        if path not in source:
            if "/learned_gate/" not in path:
                raise ValueError(f"weight {path!r} of the gated model has no source in model.")
            continue
        value = source[path]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                f"weight {path!r}: the source has shape {tuple(value.shape)}, the gated "
                f"model expects {tuple(variable.shape)}."
            )
        variable.assign(value)
    return gated


def _weights_by_path(model: keras.Model) -> dict:
    weights = {}
    for weight in model.weights:
        if weight.path in weights:
            raise ValueError(f"two weights of {model.name!r} share the path {weight.path!r}.")
        weights[weight.path] = weight
    return weights
