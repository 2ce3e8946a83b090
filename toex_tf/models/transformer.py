"""`EarlyExitTransformer`: an encoder-decoder Transformer with exits on the decoder layers."""

import keras
from keras import ops

from toex_tf.config import TransformerConfig, transformer_preset
from toex_tf.layers import (
    EarlyExitBlock,
    EncoderBlock,
    LightweightOutputEmbedding,
    PositionEmbedding,
    TopKConfidenceGate,
    TransformerBlock,
)
from toex_tf.models.base import AdaptiveModel

# The inputs of `EarlyExitTransformer`, keras-hub's seq2seq names (BART, T5).
INPUT_NAMES = ("encoder_token_ids", "encoder_padding_mask", "decoder_token_ids")


@keras.saving.register_keras_serializable(package="toex_tf")
class EarlyExitTransformer(AdaptiveModel, keras.Model):
    """Encoder-decoder Transformer whose decoder blocks may carry exit heads.

    The encoder (bidirectional `EncoderBlock`s under the source padding mask) runs once
    per source sentence; the decoder is a stack of `EarlyExitBlock`s around
    `TransformerBlock(cross_attention=True)`, so every decoder token can leave early,
    and the decode engine treats the decoder like any decoder-only model (`blocks`,
    `embed_tokens`), with each layer's cross-attention keys and values computed once per
    sentence (`decoder_context`). The baseline is the same model with
    `exit_layers="none"`.

    Inputs: a dict with `"encoder_token_ids"` `(batch, source_len)`,
    `"encoder_padding_mask"` `(batch, source_len)` (1 for real tokens) and
    `"decoder_token_ids"` `(batch, target_len)` (the target shifted right behind a start
    token). Outputs (the `AdaptiveModel` contract): `"logits"`, the final layer's
    `(batch, target_len, vocab)`, and `"exit_logits"`, one per exit layer, the final
    one last.

    Args:
        vocab_size, max_source_length, max_length, hidden_dim, num_encoder_layers,
        num_layers, num_heads, intermediate_dim, dropout, exit_layers,
        output_embedding_mode, shortlist_size, low_rank, layer_dropout, gate_criterion,
        gate_threshold, norm_epsilon, tie_embeddings: the fields of
            `toex_tf.config.TransformerConfig`. With `tie_embeddings=False` the inputs
            use their own `keras.layers.Embedding` (`"input_embedding"`) and the
            `LightweightOutputEmbedding` is the output head only.
        seed: int, seed of the layer-dropout draws. Defaults to `0`.
        **kwargs: base `keras.Model` arguments.

    Example:
    >>> model = EarlyExitTransformer(**transformer_preset("tiny").to_dict())
    >>> outputs = model({"encoder_token_ids": np.ones((1, 5), "int32"),
    ...                  "encoder_padding_mask": np.ones((1, 5), "int32"),
    ...                  "decoder_token_ids": np.ones((1, 3), "int32")})

    References:
        Vaswani et al., "Attention Is All You Need", 2017. Schuster et al., "Confident
        Adaptive Language Modeling" (CALM), 2022: decoder exits in T5.
    """

    def __init__(
        self,
        vocab_size: int,
        max_source_length: int,
        max_length: int,
        hidden_dim: int,
        num_encoder_layers: int,
        num_layers: int,
        num_heads: int,
        intermediate_dim: int | None = None,
        dropout: float = 0.1,
        exit_layers="all",
        output_embedding_mode: str = "shortlist",
        shortlist_size: int = 256,
        low_rank: int = 64,
        layer_dropout: float = 0.0,
        gate_criterion: str = "max_prob",
        gate_threshold: float = 0.9,
        norm_epsilon: float = 1e-5,
        tie_embeddings: bool = True,
        seed: int = 0,
        **kwargs,
    ):
        config = TransformerConfig(
            vocab_size=vocab_size,
            max_source_length=max_source_length,
            max_length=max_length,
            hidden_dim=hidden_dim,
            num_encoder_layers=num_encoder_layers,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_dim=intermediate_dim,
            dropout=dropout,
            exit_layers=exit_layers,
            output_embedding_mode=output_embedding_mode,
            shortlist_size=shortlist_size,
            low_rank=low_rank,
            layer_dropout=layer_dropout,
            gate_criterion=gate_criterion,
            gate_threshold=gate_threshold,
            norm_epsilon=norm_epsilon,
            tie_embeddings=tie_embeddings,
        )
        inputs = {
            "encoder_token_ids": keras.Input((None,), dtype="int32", name="encoder_token_ids"),
            "encoder_padding_mask": keras.Input(
                (None,), dtype="int32", name="encoder_padding_mask"
            ),
            "decoder_token_ids": keras.Input((None,), dtype="int32", name="decoder_token_ids"),
        }
        head = LightweightOutputEmbedding(
            vocab_size=vocab_size,
            hidden_dim=hidden_dim,
            mode=output_embedding_mode,
            shortlist_size=config.shortlist_size,
            rank=low_rank,
            name="token_embedding",
        )
        if tie_embeddings:

            def embed(token_ids):
                return head(token_ids, mode="embed")

        else:
            embed = keras.layers.Embedding(
                vocab_size,
                hidden_dim,
                embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
                name="input_embedding",
            )
        intermediate = intermediate_dim or 4 * hidden_dim
        head_dim = hidden_dim // num_heads
        source_mask = inputs["encoder_padding_mask"]
        x = embed(inputs["encoder_token_ids"])
        x = PositionEmbedding(max_source_length, name="encoder_position_embedding")(x)
        x = keras.layers.Dropout(dropout, name="encoder_embedding_dropout")(x)
        for layer in range(1, num_encoder_layers + 1):
            x = EncoderBlock(
                num_heads=num_heads,
                head_dim=head_dim,
                intermediate_dim=intermediate,
                norm_epsilon=norm_epsilon,
                dropout=dropout,
                name=f"encoder_block_{layer}",
            )(x, padding_mask=source_mask)
        encoder_outputs = keras.layers.LayerNormalization(
            epsilon=norm_epsilon, name="encoder_norm"
        )(x)
        y = embed(inputs["decoder_token_ids"])
        y = PositionEmbedding(max_length, name="position_embedding")(y)
        y = keras.layers.Dropout(dropout, name="embedding_dropout")(y)
        exit_logits = []
        for layer in range(1, num_layers + 1):
            has_exit = layer in config.exit_layers
            block = EarlyExitBlock(
                TransformerBlock(
                    num_heads=num_heads,
                    head_dim=head_dim,
                    intermediate_dim=intermediate,
                    norm_epsilon=norm_epsilon,
                    dropout=dropout,
                    cross_attention=True,
                    name="transformer",
                ),
                output_embedding=head if has_exit else None,
                norm_epsilon=norm_epsilon,
                gate=TopKConfidenceGate(gate_criterion, gate_threshold, name="gate")
                if has_exit
                else None,
                layer_dropout=layer_dropout * layer / num_layers,
                seed=seed + layer,
                name=f"block_{layer}",
            )
            output = block(y, encoder_outputs=encoder_outputs, encoder_padding_mask=source_mask)
            if has_exit:
                y, logits = output
                exit_logits.append(logits)
            else:
                y = output
        outputs = {"logits": exit_logits[-1], "exit_logits": exit_logits}
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.config = config
        self.seed = seed

    # -- What the decode engine reads (`AdaptiveModel`, plus the encoder side). --

    is_encoder_decoder = True

    @property
    def max_source_length(self) -> int:
        return self.config.max_source_length

    @property
    def token_embedding(self):
        """The `LightweightOutputEmbedding`: the output head of every exit (and the input
        embedding too when tied). Untied, it is not a top-level layer: the exits hold it."""
        return self.blocks[-1].output_embedding

    def _embed(self, token_ids):
        if self.config.tie_embeddings:
            return self.token_embedding(token_ids, mode="embed")
        return self.get_layer("input_embedding")(token_ids)

    def embed_tokens(self, token_ids, start_index=0, position_ids=None):
        """Decoder token plus position embeddings (`AdaptiveModel`)."""
        positions = self.get_layer("position_embedding")
        return positions(self._embed(token_ids), start_index=start_index, position_ids=position_ids)

    def encode(self, encoder_token_ids, encoder_padding_mask):
        """The encoder's output `(batch, source_len, hidden)` (run once per sentence)."""
        x = self.get_layer("encoder_position_embedding")(self._embed(encoder_token_ids))
        for layer in range(1, self.config.num_encoder_layers + 1):
            x = self.get_layer(f"encoder_block_{layer}")(x, padding_mask=encoder_padding_mask)
        return self.get_layer("encoder_norm")(x)

    def decoder_context(self, encoder_token_ids, encoder_padding_mask) -> list[dict]:
        """What each decoder block's call needs besides its input, for one batch of sources.

        Runs the encoder once and projects each decoder layer's cross-attention keys and
        values from it once: a decode step then only runs the query side.

        Returns:
            One dict per decoder layer: `{"encoder_kv": (key, value),
            "encoder_padding_mask": mask}`, keyword arguments of the block's call.
        """
        encoder_outputs = self.encode(encoder_token_ids, encoder_padding_mask)
        mask = ops.cast(encoder_padding_mask, "int32")
        return [
            {
                "encoder_kv": block.block.cross_attention_layer.project_kv(encoder_outputs),
                "encoder_padding_mask": mask,
            }
            for block in self.blocks
        ]

    def get_config(self):
        config = self.config.to_dict()
        config["exit_layers"] = list(config["exit_layers"])
        return {"name": self.name, "trainable": self.trainable, **config, "seed": self.seed}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def build_transformer(config: TransformerConfig | str, **overrides) -> EarlyExitTransformer:
    """Builds an `EarlyExitTransformer` from a `TransformerConfig` or a preset name."""
    if isinstance(config, str):
        config = transformer_preset(config, **overrides)
    elif overrides:
        config = TransformerConfig(**{**config.to_dict(), **overrides})
    return EarlyExitTransformer(**config.to_dict())
