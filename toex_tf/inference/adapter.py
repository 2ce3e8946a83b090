"""`DecoderAdapter`: the engine's view of a model, built from the `AdaptiveModel` interface.

It holds what decoding needs (the embedding, the blocks with their exits, the shared
head, the KV-cache layout and the cache length) and the two calls every mode builds on:
`embed` (tokens at a position, left padding included) and `run_block` (one block over a
window, writing its cache). It never asks the model its type.
"""

import copy

from keras import ops


class DecoderAdapter:
    """What the decode engine needs from a model.

    Args:
        model: a model offering the `toex_tf.models.base.AdaptiveModel` interface
            (`EarlyExitGPT`, `HierarchicalLlama`).
        max_length: int or None, the cache length (prompt plus generated tokens);
            default and upper bound: the model's `max_length`.
        routing: None, or the `SkipRouter` routing every block call uses: `"all"` runs
            every FFN (full depth in both dimensions), `"predictor"` the causal routers.
            None: the blocks' default (`"predictor"` outside training).

    Example:
    >>> adapter = DecoderAdapter(build_gpt("tiny"))
    >>> tokens, exit_layers = generate(adapter, [[5, 6, 7]], 8)
    """

    def __init__(self, model, max_length: int | None = None, routing: str | None = None):
        length = max_length or model.max_length
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"max_length must be a positive int; got {max_length!r}.")
        if length > model.max_length:
            raise ValueError(
                f"max_length={length} exceeds the model's max_length={model.max_length}."
            )
        self.model = model
        self.routing = routing
        self.blocks = list(model.blocks)
        self.max_length = length
        self.exit_layers = tuple(i + 1 for i, b in enumerate(self.blocks) if b.has_exit)
        if not self.exit_layers or self.exit_layers[-1] != len(self.blocks):
            raise ValueError("the last block must carry the final exit head.")
        self.output_embedding = self.blocks[-1].output_embedding
        attention = self.blocks[0].block.self_attention
        self.kv_heads, self.head_dim = attention.num_kv_heads, attention.head_dim
        self.context = None

    def with_context(self, context: list) -> "DecoderAdapter":
        """A copy whose block calls also get `context[index]` as keyword arguments.

        An encoder-decoder model's `decoder_context(...)` gives each decoder layer its
        cross-attention keys and values for one batch of sources; every mode then runs
        the decoder as it runs a decoder-only model (a lazy catch-up re-runs the
        cross-attention of the pending positions with the same keys and values).
        """
        if len(context) != self.num_layers:
            raise ValueError(
                f"context has {len(context)} entries; expected one per layer ({self.num_layers})."
            )
        adapter = copy.copy(self)
        adapter.context = list(context)
        return adapter

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def vocab_size(self) -> int:
        return self.output_embedding.vocab_size

    @property
    def hidden_dim(self) -> int:
        return self.output_embedding.hidden_dim

    def decision_layers(self, policy) -> tuple:
        """The segment ends of a step: the policy's decision exits plus the final layer.

        Also checks that the policy can run on this model (a `learned` criterion needs a
        `LearnedExitGate` on every decision exit).
        """
        if policy.decision_layers is None:
            layers = self.exit_layers
        else:
            missing = sorted(set(policy.decision_layers) - set(self.exit_layers))
            if missing:
                raise ValueError(
                    f"decision_layers {missing} carry no exit head; the model's exits are "
                    f"{list(self.exit_layers)}."
                )
            layers = tuple(sorted(set(policy.decision_layers) | {self.num_layers}))
        if policy.criterion == "learned" and policy.mode != "full":
            missing = [
                end
                for end in layers[:-1]
                if getattr(self.blocks[end - 1], "learned_gate", None) is None
            ]
            if missing:
                raise ValueError(
                    f"criterion 'learned' needs a LearnedExitGate on every decision exit; "
                    f"exits {missing} have none (add them with "
                    f"toex_tf.models.add_learned_gates and train them with "
                    f"toex_tf.training.gate_training.fit_learned_gates)."
                )
        return layers

    def empty_caches(self, batch_size: int, extra: int = 0, dtype="float32") -> list:
        """Zero caches of `max_length + extra` positions (lazy mode needs a window's slack)."""
        shape = (batch_size, 2, self.kv_heads, self.max_length + extra, self.head_dim)
        return [ops.zeros(shape, dtype) for _ in self.blocks]

    def embed(self, token_ids, position, padding=None):
        """Token embeddings at `position`; per-row positions for a left-padded batch.

        Args:
            token_ids: int `(batch, seq)`.
            position: scalar, the column of the first token (shared by the batch).
            padding: None, or `(key_mask, offsets)` from `padding_state`.
        """
        if padding is None:
            return self.model.embed_tokens(token_ids, position)
        seq = ops.shape(token_ids)[1]
        columns = ops.cast(position, "int32") + ops.arange(seq, dtype="int32")[None, :]
        return self.model.embed_tokens(
            token_ids, position, position_ids=columns - padding[1][:, None]
        )

    def run_block(self, index, hidden, caches, position, padding=None):
        """Runs block `index` over `hidden` at `position`: `(hidden, its new cache)`."""
        key_mask = None if padding is None else padding[0]
        extra = {} if self.routing is None else {"routing": self.routing}
        if self.context is not None:
            extra.update(self.context[index])
        return self.blocks[index].block(
            hidden,
            padding_mask=key_mask,
            cache=caches[index],
            cache_update_index=position,
            **extra,
        )
