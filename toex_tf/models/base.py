"""`AdaptiveModel`: the one interface every model family offers the engine.

The decode engine (`toex_tf.inference`), the export and the analysis read a model only
through these members, so they never ask a model its type (keras-hub puts
`call_with_cache` on its models for the same reason). A family (`EarlyExitGPT`,
`HierarchicalLlama`, the encoder-decoder next) mixes it into its `keras.Model`.

The contract:
    config            the family's config dataclass; every family's has `vocab_size`,
                      `max_length`, `hidden_dim`, `num_layers`, `exit_layers` and
                      `capacity`.
    outputs           `model(token_ids)` returns a dict: `"logits"`, the final layer's
                      `(batch, seq, vocab)`, and `"exit_logits"`, one such tensor per
                      exit layer in ascending order, the final one last.
    token_embedding   the `LightweightOutputEmbedding`: the input embedding, and the
                      output head of the final exit (shared with the other exits, or
                      not; each `EarlyExitBlock` holds its own reference).
    blocks            the `EarlyExitBlock`s in order; each wraps a `TransformerBlock`
                      whose attention owns the KV-cache layout (`num_kv_heads`,
                      `head_dim`) and whose `call` takes `cache`/`cache_update_index`.
    embed_tokens      `(token_ids, start_index, position_ids=None) -> (batch, seq,
                      hidden)`: the embedding of tokens at absolute positions
                      `start_index + i`, or at per-row `position_ids` (left padding).
    routers, gates     the FFN skip routers and the learned exit gates (maybe empty).
"""

from toex_tf.layers.skip_router import SkipRouter


class AdaptiveModel:
    """Mixin for a `keras.Model` family with exits (see the module docstring).

    A subclass sets `self.config` after building its Functional graph and implements
    `embed_tokens`.
    """

    config = None
    # An encoder-decoder family sets it and offers `max_source_length`, `encode` and
    # `decoder_context(source_ids, source_padding_mask)` (per-layer block arguments).
    is_encoder_decoder = False

    @property
    def exit_layers(self) -> tuple[int, ...]:
        """1-based numbers of the layers that carry an exit, ascending (final included)."""
        return tuple(self.config.exit_layers)

    @property
    def num_layers(self) -> int:
        return self.config.num_layers

    @property
    def max_length(self) -> int:
        """The longest sequence (prompt plus generated tokens) the model takes."""
        return self.config.max_length

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def token_embedding(self):
        """The `LightweightOutputEmbedding` (embedding and output head)."""
        return self.get_layer("token_embedding")

    @property
    def blocks(self) -> list:
        """The `EarlyExitBlock`s, layer 1 first."""
        return [self.get_layer(f"block_{i}") for i in range(1, self.num_layers + 1)]

    @property
    def routers(self) -> list:
        """The FFN `SkipRouter`s, one per routed layer (empty at capacity 1.0)."""
        return [b.block.ffn for b in self.blocks if isinstance(b.block.ffn, SkipRouter)]

    @property
    def gates(self) -> list:
        """The learned exit gates of the non-final exits, in layer order."""
        return [b.learned_gate for b in self.blocks if b.learned_gate is not None]

    def embed_tokens(self, token_ids, start_index=0, position_ids=None):
        """Embeddings `(batch, seq, hidden)` of `token_ids` at their positions."""
        raise NotImplementedError(f"{type(self).__name__} must implement embed_tokens.")
