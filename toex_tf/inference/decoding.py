"""KV-cached early-exit decoding, written in `keras.ops` so it compiles on TF and JAX.

The engine sees a `DecoderAdapter`: an embedding function, a list of blocks (some with
exit heads) and the shared output embedding. It never sees GPT specifics, so the Llama
and encoder-decoder models can reuse it.

A decode step runs the layers in *segments* that end at exit layers. After a segment,
the exit's cheap head (`LightweightOutputEmbedding` shortlist or low-rank) feeds a
confidence criterion; the full vocabulary head runs once, on the normed hidden state
of the exit each row took. Decisions happen at segment ends only: on a GPU a
data-dependent branch costs about as much as a small layer (DESIGN.md §4).

Modes (DESIGN.md §3):
    full      every layer; the prediction comes from the final layer.
    unfrozen  every layer (exact caches); the prediction comes from the first exit that
              passes. The quality reference for the cheaper modes.
    frozen    when every row of the batch has exited, the remaining segments are skipped
              (one `ops.cond` per segment); their K/V at this position are projected from
              the exit hidden state (CALM state propagation), so later tokens still find
              keys there. Not exact.
    lazy      skipped layers are deferred: the next token that goes deep first computes
              them for every pending position in one windowed pass (FREE, EE-LLM), so the
              caches stay exact and the tokens are exactly `unfrozen`'s.

Criteria (`ExitPolicy.criterion`), each a confidence in [0, 1] checked against the
threshold at a decision exit:
    max_prob, margin, entropy   the cheap head's softmax (`TopKConfidenceGate`).
    kl          `exp(-KL(p_k || p_prev))` between the cheap-head distributions of this
                exit and the previous decision exit: the prediction stopped moving.
                The first decision exit has no previous one and never passes.
    saturation  cosine between the hidden state here and at the previous decision exit
                (the embedding before the first): hidden-state saturation (CALM's
                "state" signal). No vocabulary projection at all.
    patience    `min(1, streak / patience)`, where streak counts the consecutive earlier
                decision exits whose cheap top-1 equals this one's (PABEE). With a
                threshold just below 1 it is the plain rule "exit after `patience`
                agreeing exits"; lower thresholds accept shorter streaks.
    learned     the exit block's `LearnedExitGate` on the normed hidden state: a learned
                consistency classifier (CALM), no vocabulary projection.
`threshold_decay` makes the threshold fall with position (CALM):
`clip(0.9 * threshold + 0.1 * exp(-decay * position / max_length), 0, 1)`; a threshold of
1.0 still never exits.

Batch policy: a segment is skipped only when every row has exited; a row that exited
earlier keeps its early prediction but its state keeps going (exact K/V for it).

Batches of prompts with different lengths are left-padded (`pad_prompts`) and carry a
padding mask: pad slots are masked out of attention at every step, and a row's learned
positions start at its first real token. RoPE needs no shift: it is relative, and every
token of a row is shifted by the same amount.
"""

import functools
from dataclasses import dataclass

import numpy as np
from keras import ops

from toex_tf.layers.causal_self_attention import write_kv_cache
from toex_tf.layers.top_k_confidence_gate import CRITERIA, TopKConfidenceGate, validate_threshold

DECODE_MODES = ("full", "unfrozen", "frozen", "lazy")
DECODE_CRITERIA = CRITERIA + ("kl", "saturation", "patience", "learned")
# Criteria that read the cheap (shortlist or low-rank) head; the others read hidden states.
CHEAP_HEAD_CRITERIA = CRITERIA + ("kl", "patience")
SAMPLING = ("greedy", "sample")


@dataclass(frozen=True)
class ExitPolicy:
    """How a decode step decides to exit.

    Attributes:
        mode: one of `DECODE_MODES`.
        criterion: one of `DECODE_CRITERIA` (see the module docstring).
        threshold: float in [0, 1]; a row exits when its confidence is above it
            (1.0 never exits). A scalar float32 tensor is accepted too (a serving
            graph's input, `toex_tf.export`); it is not range-checked here.
        max_pending: lazy mode: the catch-up window. At most `max_pending - 1` tokens
            wait for a layer; then the next token goes deep and computes them all.
        decision_layers: exits (1-based layers) where the step may decide; None: every
            exit of the model. Each decision is one data-dependent branch, which costs
            about a small layer on a GPU (DESIGN.md §4), so decide at a few exits there.
        patience: `patience` criterion: agreeing exits needed (int >= 1).
        threshold_decay: None (a constant threshold) or a float >= 0, the CALM decay
            temperature of a threshold that falls with position.
    """

    mode: str = "full"
    criterion: str = "max_prob"
    threshold: float = 1.0
    max_pending: int = 8
    decision_layers: tuple | None = None
    patience: int = 2
    threshold_decay: float | None = None

    def __post_init__(self):
        if self.mode not in DECODE_MODES:
            raise ValueError(f"mode must be one of {DECODE_MODES}; got {self.mode!r}.")
        if self.criterion not in DECODE_CRITERIA:
            raise ValueError(f"criterion must be one of {DECODE_CRITERIA}; got {self.criterion!r}.")
        if not _is_scalar_tensor(self.threshold):
            validate_threshold(self.threshold)
        if isinstance(self.patience, bool) or not isinstance(self.patience, int):
            raise ValueError(f"patience must be an int >= 1; got {self.patience!r}.")
        if self.patience < 1:
            raise ValueError(f"patience must be an int >= 1; got {self.patience!r}.")
        decay = self.threshold_decay
        if decay is not None and (
            isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay >= 0
        ):
            raise ValueError(f"threshold_decay must be None or a float >= 0; got {decay!r}.")
        if (
            isinstance(self.max_pending, bool)
            or not isinstance(self.max_pending, int)
            or (self.max_pending < 2)
        ):
            raise ValueError(f"max_pending must be an int >= 2; got {self.max_pending!r}.")

    def threshold_at(self, positions, max_length: int):
        """The threshold at `positions` (any int shape): constant, or decaying (CALM)."""
        if self.threshold_decay is None:
            return self.threshold
        dynamic = _is_scalar_tensor(self.threshold)
        if not dynamic and self.threshold >= 1.0:
            return self.threshold
        fraction = ops.cast(positions, "float32") / float(max_length)
        decayed = 0.9 * self.threshold + 0.1 * ops.exp(-float(self.threshold_decay) * fraction)
        decayed = ops.clip(decayed, 0.0, 1.0)
        if dynamic:  # 1.0 still never exits
            return ops.where(self.threshold >= 1.0, self.threshold, decayed)
        return decayed


def _is_scalar_tensor(value) -> bool:
    """A scalar tensor (not a Python or numpy number): a runtime threshold."""
    if isinstance(value, (bool, int, float, np.number)):
        return False
    shape = getattr(value, "shape", None)
    return shape is not None and tuple(shape) == () and "float" in str(value.dtype)


class DecoderAdapter:
    """What the decode engine needs from a model.

    Args:
        embed: `embed(token_ids (batch, seq), start_index, position_ids=None) ->
            (batch, seq, hidden)`; `position_ids` `(batch, seq)` is given for
            left-padded batches (a model with relative positions may ignore it).
        blocks: the model's `EarlyExitBlock`s in order; each wraps a `TransformerBlock`
            (its `attention_norm` and `self_attention.project_kv` serve the frozen mode).
        max_length: longest sequence (prompt + generated).
        routing: None, or a `SkipRouter` routing every block call uses: `"all"` runs
            every FFN (full depth in both dimensions), `"predictor"` the causal routers.
            None: the blocks' default (`"predictor"` outside training).
    """

    def __init__(self, embed, blocks, max_length: int, routing: str | None = None):
        self.embed = embed
        self.routing = routing
        self.blocks = list(blocks)
        self.max_length = max_length
        self.exit_layers = tuple(i + 1 for i, b in enumerate(self.blocks) if b.has_exit)
        if not self.exit_layers or self.exit_layers[-1] != len(self.blocks):
            raise ValueError("the last block must carry the final exit head.")
        self.output_embedding = self.blocks[-1].output_embedding
        attention = self.blocks[0].block.self_attention
        self.kv_heads, self.head_dim = attention.num_kv_heads, attention.head_dim

    @classmethod
    def from_gpt(cls, model) -> "DecoderAdapter":
        """The adapter of an `EarlyExitGPT`."""
        token_embedding = model.token_embedding
        positions = model.get_layer("position_embedding")

        def embed(token_ids, start_index, position_ids=None):
            embedded = token_embedding(token_ids, mode="embed")
            return positions(embedded, start_index=start_index, position_ids=position_ids)

        return cls(embed, model.blocks, model.gpt_config.max_length)

    @classmethod
    def from_llama(
        cls, model, max_length: int | None = None, routing: str | None = None
    ) -> "DecoderAdapter":
        """The adapter of a `HierarchicalLlama`; `max_length` (default: the config's)
        sizes the KV caches, `routing="all"` turns the FFN skip routers off. RoPE is
        applied inside attention, so `embed` ignores positions (it is relative: a
        left-padded row needs no shift)."""
        token_embedding = model.token_embedding
        length = max_length or model.llama_config.max_length
        if length > model.llama_config.max_length:
            raise ValueError(
                f"max_length={length} exceeds the model's max_length="
                f"{model.llama_config.max_length}."
            )

        def embed(token_ids, start_index, position_ids=None):
            return token_embedding(token_ids, mode="embed")

        return cls(embed, model.blocks, length, routing)

    @classmethod
    def from_model(cls, model, **kwargs) -> "DecoderAdapter":
        """The adapter of an `EarlyExitGPT` or a `HierarchicalLlama`."""
        if hasattr(model, "llama_config"):
            return cls.from_llama(model, **kwargs)
        if hasattr(model, "gpt_config"):
            return cls.from_gpt(model)
        raise TypeError(f"no decoder adapter for {type(model).__name__}.")

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def vocab_size(self) -> int:
        return self.output_embedding.vocab_size

    def decision_layers(self, policy: ExitPolicy) -> tuple:
        """The segment ends of a step: the policy's decision exits plus the final layer.

        Also checks that the policy can run on this model (a `learned` criterion needs a
        `LearnedExitGate` on every decision exit).
        """
        layers = self._decision_layers(policy)
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

    def _decision_layers(self, policy: ExitPolicy) -> tuple:
        if policy.decision_layers is None:
            return self.exit_layers
        missing = sorted(set(policy.decision_layers) - set(self.exit_layers))
        if missing:
            raise ValueError(
                f"decision_layers {missing} carry no exit head; the model's exits are "
                f"{list(self.exit_layers)}."
            )
        return tuple(sorted(set(policy.decision_layers) | {self.num_layers}))

    def empty_caches(self, batch_size: int, extra: int = 0, dtype="float32") -> list:
        """Zero caches of `max_length + extra` positions (lazy mode needs a window's slack)."""
        shape = (batch_size, 2, self.kv_heads, self.max_length + extra, self.head_dim)
        return [ops.zeros(shape, dtype) for _ in self.blocks]

    def empty_lazy_state(self, batch_size: int, prompt_length, extra: int, hidden_dim: int):
        """Lazy mode: per-position hidden states and per-layer fill pointers after prefill."""
        states = ops.zeros((batch_size, self.max_length + extra, hidden_dim))
        filled = ops.full((self.num_layers,), prompt_length, "int32")
        return states, filled


def _block_call(adapter, index, hidden, caches, position, padding):
    """Runs block `index` over `hidden` at `position`, writing its cache."""
    key_mask = None if padding is None else padding[0]
    extra = {} if adapter.routing is None else {"routing": adapter.routing}
    return adapter.blocks[index].block(
        hidden, padding_mask=key_mask, cache=caches[index], cache_update_index=position, **extra
    )


def _embed(adapter, token_ids, position, padding):
    """Token embeddings at `position`; per-row positions for a left-padded batch."""
    if padding is None:
        return adapter.embed(token_ids, position)
    seq = ops.shape(token_ids)[1]
    columns = ops.cast(position, "int32") + ops.arange(seq, dtype="int32")[None, :]
    return adapter.embed(token_ids, position, position_ids=columns - padding[1][:, None])


def prefill(adapter: DecoderAdapter, prompt, caches, padding=None):
    """Runs the prompt through every layer, filling the caches at positions `[0, P)`.

    Args:
        padding: None, or `(key_mask, offsets)` from `padding_state`: a left-padded batch.

    Returns:
        `(logits (batch, vocab) of the last prompt position at full depth, caches)`.
    """
    hidden = _embed(adapter, prompt, 0, padding)
    caches = list(caches)
    for index in range(adapter.num_layers):
        hidden, caches[index] = _block_call(adapter, index, hidden, caches, 0, padding)
    logits = adapter.blocks[-1].exit_logits(hidden[:, -1:])
    return logits[:, 0], caches


def padding_state(padding_mask, cache_length: int):
    """`(key_mask (batch, cache_length) bool, offsets (batch,) int32)` of a left-padded batch.

    `offsets` is each row's pad count: its first real token sits at column `offsets[b]`
    and has position 0. Columns past the prompt (generated tokens) are never masked.
    """
    mask = ops.cast(padding_mask, "bool")
    batch, prompt_length = ops.shape(mask)[0], ops.shape(mask)[1]
    rest = ops.ones((batch, cache_length - prompt_length), "bool")
    offsets = prompt_length - ops.sum(ops.cast(mask, "int32"), axis=1)
    return ops.concatenate([mask, rest], axis=1), ops.cast(offsets, "int32")


def pad_prompts(prompts, pad_id: int = 0):
    """Left-pads token-id lists of different lengths: `(prompt, padding_mask)` int32 arrays.

    Left padding keeps every row's last prompt token in the last column, so one decode
    position serves the whole batch.
    """
    rows = [list(row) for row in prompts]
    if not rows or any(len(row) == 0 for row in rows):
        raise ValueError("pad_prompts needs at least one prompt and no empty prompt.")
    length = max(len(row) for row in rows)
    prompt = np.full((len(rows), length), pad_id, "int32")
    mask = np.zeros((len(rows), length), "int32")
    for index, row in enumerate(rows):
        prompt[index, length - len(row) :] = row
        mask[index, length - len(row) :] = 1
    return prompt, mask


def write_time_slice(buffer, start, values):
    """`buffer` `(batch, time, ...)` with `values` `(batch, n, ...)` written at time
    `[start, start + n)`, which must lie inside it.

    A scatter rather than `ops.slice_update`: on TensorFlow that is `XlaDynamicUpdateSlice`,
    which runs through XLA (a compiled kernel per call in graph mode, about 0.3 ms on this
    CPU, and no TF Serving without XLA); under JAX both are the same in-place update.
    """
    batch, count = ops.shape(values)[0], ops.shape(values)[1]
    times = ops.cast(start, "int32") + ops.arange(count, dtype="int32")
    grid = (batch, count)
    indices = ops.stack(
        [
            ops.broadcast_to(ops.arange(batch, dtype="int32")[:, None], grid),
            ops.broadcast_to(times[None, :], grid),
        ],
        axis=-1,
    )
    values = ops.cast(values, buffer.dtype)
    return ops.scatter_update(
        buffer, ops.reshape(indices, (-1, 2)), ops.reshape(values, (-1,) + tuple(buffer.shape[2:]))
    )


def _copy(caches):
    """A shallow copy of a cache container: a list of every layer's cache, or a dict of
    the caches a segment touches (so a segment's `cond` carries only those)."""
    return dict(caches) if isinstance(caches, dict) else list(caches)


def _run_layers(adapter, layers, hidden, caches, position, padding):
    caches = _copy(caches)
    for index in layers:
        hidden, caches[index] = _block_call(adapter, index, hidden, caches, position, padding)
    return hidden, caches


def _propagate_kv(adapter, layers, hidden, caches, position):
    """Frozen mode: K/V of skipped layers projected from the exit hidden state (CALM)."""
    caches = _copy(caches)
    for index in layers:
        block = adapter.blocks[index].block
        key, value = block.self_attention.project_kv(
            block.attention_norm(hidden), start_index=position
        )
        caches[index] = write_kv_cache(caches[index], key, value, position)
    return caches


def _lazy_chunk(
    adapter, layers, caches, lazy, position, width, padding=None, write_back=True, hidden=None
):
    """Lazy mode: runs `layers` over the pending positions plus `position`, in one pass.

    Pending positions at a layer always form the run `[filled[l], position)`, and the
    layers of one segment are always filled together, so one static window of `width`
    positions from `filled[layers[0]]` covers them all (the engine never lets more than
    `width - 1` pile up). The window passes from layer to layer in place; the state
    buffer is written once at the end, and not at all when no later layer will read it
    (`write_back=False`). `hidden`, the current token's state, goes into its slot of the
    window: a token that goes deep never writes the buffer. Window slots past `position`
    compute garbage into cache slots that causal masking hides and later writes overwrite.
    """
    states, filled = lazy
    caches = _copy(caches)
    batch, hidden_dim = ops.shape(states)[0], ops.shape(states)[2]
    zero = ops.zeros((), "int32")
    start = filled[layers[0]]
    window = ops.slice(states, (zero, start, zero), (batch, width, hidden_dim))
    # In a decode step `start <= position`; `flush_lazy` also visits layers with nothing
    # pending (start = position + 1), whose returned state nobody reads.
    offset = ops.maximum(ops.cast(position, "int32") - start, 0)
    if hidden is not None:
        window = write_time_slice(window, offset, hidden)
    for index in layers:
        window, caches[index] = _block_call(adapter, index, window, caches, start, padding)
    if write_back:
        states = write_time_slice(states, start, window)
    filled = _mark_filled(filled, layers, position)
    hidden = ops.slice(window, (zero, offset, zero), (batch, 1, hidden_dim))
    return hidden, caches, (states, filled)


def _mark_filled(filled, layers, position):
    in_segment = ops.logical_and(
        ops.arange(ops.shape(filled)[0]) >= layers[0],
        ops.arange(ops.shape(filled)[0]) <= layers[-1],
    )
    return ops.where(in_segment, ops.cast(position, "int32") + 1, filled)


def _write_state(lazy, hidden, position):
    states, filled = lazy
    return write_time_slice(states, position, hidden), filled


def _exit_confidence(policy, gate, block, normed, hidden, memory, first, cheap_head=None):
    """Confidence `(batch,)` of one decision exit, and the criterion's memory for the next.

    `memory` carries what a criterion compares across the decision exits of one step:
    the previous hidden state (saturation), cheap-head log-probs (kl), or top-1 and
    streak (patience). It is None before the first decision for kl and patience.
    """
    criterion = policy.criterion
    if criterion == "learned":
        return ops.cast(block.learned_gate(normed), "float32")[:, 0], memory
    if criterion == "saturation":
        current = ops.cast(hidden[:, 0], "float32")
        previous = memory
        dot = ops.sum(current * previous, axis=-1)
        norms = ops.sqrt(ops.sum(current * current, -1) * ops.sum(previous * previous, -1))
        return ops.clip(dot / (norms + 1e-12), 0.0, 1.0), current
    if cheap_head is None:
        cheap = block.output_embedding(normed, mode="cheap_logits")
    else:
        cheap = block.output_embedding.apply_cheap_head(normed, cheap_head)
    if criterion in CRITERIA:
        return gate.confidence(cheap)[:, 0], memory
    if criterion == "kl":
        log_probs = ops.log_softmax(ops.cast(cheap[:, 0], "float32"), axis=-1)
        if first:
            return ops.zeros_like(log_probs[:, 0]), log_probs
        divergence = ops.sum(ops.exp(log_probs) * (log_probs - memory), axis=-1)
        return ops.exp(-ops.maximum(divergence, 0.0)), log_probs
    # patience
    top = ops.cast(ops.argmax(cheap[:, 0], axis=-1), "int32")
    if first:
        streak = ops.zeros_like(top)
    else:
        previous_top, streak = memory
        streak = ops.where(ops.equal(top, previous_top), streak + 1, 0)
    confidence = ops.minimum(ops.cast(streak, "float32") / float(policy.patience), 1.0)
    return confidence, (top, streak)


def decode_step(
    adapter: DecoderAdapter,
    policy: ExitPolicy,
    token_ids,
    position,
    caches,
    lazy=(),
    padding=None,
):
    """One token per row through the layers, with exits.

    Args:
        adapter: the model.
        policy: mode, criterion and threshold.
        token_ids: int `(batch, 1)`, the tokens at `position`.
        position: scalar, their absolute position (the column; shared by the batch).
        caches: one KV cache per layer (`max_length + policy.max_pending` long in lazy
            mode: `adapter.empty_caches(batch, policy.max_pending)`).
        lazy: lazy mode only: `(states, filled)` from `adapter.empty_lazy_state`: the
            hidden state each pending position stopped at, `(batch, max_length +
            max_pending, hidden)`, and per-layer fill pointers `(layers,)` (positions
            below `filled[l]` have exact K/V at layer `l`).
        padding: None, or `(key_mask, offsets)` of a left-padded batch (`padding_state`).

    Returns:
        `(logits (batch, vocab), exit_layer (batch,) int32, caches, lazy, depth)`: the
        logits of the exit each row took, its 1-based layer, the updated state, and how
        many layers this step ran (a lazy catch-up window counts as one pass per layer).
    """
    gate = TopKConfidenceGate(
        criterion=policy.criterion if policy.criterion in CRITERIA else "max_prob"
    )
    hidden = _embed(adapter, token_ids, position, padding)
    batch = ops.shape(hidden)[0]
    num_layers = adapter.num_layers
    mode = policy.mode
    width = policy.max_pending
    row_positions = ops.cast(position, "int32") - (0 if padding is None else padding[1])
    threshold = policy.threshold_at(row_positions, adapter.max_length)
    decided = ops.zeros((batch,), "bool")
    exit_layer = ops.full((batch,), num_layers, "int32")
    chosen = ops.zeros_like(hidden)  # normed hidden state of the exit each row took
    force = ops.zeros((), "bool")
    if mode == "lazy":
        if not lazy:
            raise ValueError(
                "lazy mode needs its state: pass lazy=adapter.empty_lazy_state(...) and "
                "caches with max_pending extra positions (generate does this)."
            )
        # Skipping now would leave `width` tokens pending at the deepest layer: go deep.
        force = ops.greater_equal(ops.cast(position, "int32") + 1 - lazy[1][-1], width)
    memory = ops.cast(hidden[:, 0], "float32") if policy.criterion == "saturation" else None
    caches = list(caches)
    # Full depth decides nothing: one segment. Otherwise the shared cheap head is built
    # once per step, before the first layer, so no check waits for its gather.
    ends = (num_layers,) if mode == "full" else adapter.decision_layers(policy)
    cheap_head = None
    if mode != "full" and policy.criterion in CHEAP_HEAD_CRITERIA:
        cheap_head = adapter.output_embedding.cheap_head(hidden.dtype)
    state = (hidden, {}, decided, exit_layer, chosen, lazy, memory)
    start = 0
    for segment, end in enumerate(ends):
        layers = list(range(start, end))
        block = adapter.blocks[end - 1]
        # The segment's `cond` carries only the caches it writes: under XLA every operand
        # of a conditional that it returns is copied, and all layers' caches are large.
        state = (state[0], {index: caches[index] for index in layers}, *state[2:])

        def compute(state, segment=segment, layers=layers, block=block, end=end, chunk=False):
            hidden, caches, decided, exit_layer, chosen, lazy, memory = state
            if chunk:  # lazy: catch up the pending positions and this one in one window
                # After the final segment no later layer reads the states buffer.
                hidden, caches, lazy = _lazy_chunk(
                    adapter,
                    layers,
                    caches,
                    lazy,
                    position,
                    width,
                    padding,
                    end < num_layers,
                    hidden,
                )
            else:
                hidden, caches = _run_layers(adapter, layers, hidden, caches, position, padding)
            normed = block.exit_norm(hidden)
            if end == num_layers:
                chosen = ops.where(decided[:, None, None], chosen, normed)
                return hidden, caches, decided, exit_layer, chosen, lazy, memory
            if mode == "full":
                return hidden, caches, decided, exit_layer, chosen, lazy, memory
            shared = cheap_head if block.output_embedding is adapter.output_embedding else None
            confidence, memory = _exit_confidence(
                policy, gate, block, normed, hidden, memory, segment == 0, shared
            )
            newly = ops.logical_and(ops.greater(confidence, threshold), ops.logical_not(decided))
            chosen = ops.where(newly[:, None, None], normed, chosen)
            exit_layer = ops.where(newly, end, exit_layer)
            decided = ops.logical_or(decided, newly)
            return hidden, caches, decided, exit_layer, chosen, lazy, memory

        def skip(state, layers=layers):
            hidden, caches, decided, exit_layer, chosen, lazy, memory = state
            if mode == "frozen":
                caches = _propagate_kv(adapter, layers, hidden, caches, position)
            if mode == "lazy":  # the exit state: a later deep token catches it up from here
                lazy = _write_state(lazy, hidden, position)
            return hidden, _copy(caches), decided, exit_layer, chosen, lazy, memory

        if segment > 0 and mode == "frozen":
            state = ops.cond(
                ops.all(state[2]),
                lambda state=state, skip=skip: skip(state),
                lambda state=state, compute=compute: compute(state),
            )
        elif segment > 0 and mode == "lazy":
            # One three-way branch per decision (a nested cond would put two decisions
            # on the critical path): skip, go deep with nothing pending, or catch up.
            can_skip = ops.logical_and(ops.all(state[2]), ops.logical_not(force))
            pending = ops.cast(position, "int32") - state[5][1][layers[0]]
            branch = ops.where(can_skip, 0, ops.where(ops.equal(pending, 0), 1, 2))
            state = ops.switch(
                branch,
                [skip, compute, functools.partial(compute, chunk=True)],
                state,
            )
        else:
            state = compute(state)
        for index in layers:
            caches[index] = state[1][index]
        start = end
    hidden, _, decided, exit_layer, chosen, lazy, _ = state
    logits = adapter.output_embedding(chosen, mode="logits")
    # Layers this step ran: skipping starts once the last row has exited (batch policy),
    # unless lazy mode had to go deep to bound the pending work.
    depth = ops.full((), num_layers, "int32")
    if mode in ("frozen", "lazy"):
        depth = ops.where(force, depth, ops.max(exit_layer))
    if mode == "lazy":
        # The layers this step computed are the prefix [0, depth): one pointer update
        # per step rather than one per segment.
        computed = ops.arange(num_layers, dtype="int32") < depth
        lazy = (lazy[0], ops.where(computed, ops.cast(position, "int32") + 1, lazy[1]))
    return logits[:, 0], exit_layer, caches, lazy, depth


def flush_lazy(
    adapter: DecoderAdapter, policy: ExitPolicy, caches, lazy, next_position, padding=None
):
    """Lazy mode: computes every pending position (below `next_position`) at every layer.

    After it, each layer's cache at positions `< next_position` is exact.
    """
    caches = list(caches)
    position = ops.cast(next_position, "int32") - 1
    for index in range(adapter.num_layers):
        _, caches, lazy = _lazy_chunk(
            adapter, [index], caches, lazy, position, policy.max_pending, padding
        )
    return caches, lazy


def sample_next(logits, sampling="greedy", temperature=1.0, top_k=0, top_p=1.0, seed=None):
    """Next token ids `(batch,)` from logits `(batch, vocab)`.

    `sample` draws from `softmax(logits / temperature)` restricted to the `top_k` most
    likely tokens (0: no limit) and to the smallest set whose probability reaches `top_p`.
    """
    if sampling == "greedy":
        return ops.cast(ops.argmax(logits, axis=-1), "int32")
    if sampling != "sample":
        raise ValueError(f"sampling must be one of {SAMPLING}; got {sampling!r}.")
    logits = ops.cast(logits, "float32") / temperature
    if top_k:
        kth = ops.top_k(logits, k=top_k)[0][:, -1:]
        logits = ops.where(logits < kth, -1e9, logits)
    if top_p < 1.0:
        sorted_logits = ops.flip(ops.sort(logits, axis=-1), axis=-1)
        cumulative = ops.cumsum(ops.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep tokens until the cumulative mass first reaches top_p (the first always).
        keep = ops.concatenate(
            [ops.ones_like(cumulative[:, :1], "bool"), cumulative[:, :-1] < top_p], axis=-1
        )
        cutoff = ops.min(ops.where(keep, sorted_logits, 1e9), axis=-1, keepdims=True)
        logits = ops.where(logits < cutoff, -1e9, logits)
    # Gumbel-max with stateless hashed noise: keras.random takes no tensor seeds, and a
    # stateful SeedGenerator cannot live inside a jitted loop.
    noise = -ops.log(-ops.log(hashed_uniform(ops.shape(logits), seed)))
    return ops.cast(ops.argmax(logits + noise, axis=-1), "int32")


def _uint32(value):
    return ops.convert_to_tensor(np.uint32(value))


def hashed_uniform(shape, seed):
    """Stateless uniforms in (0, 1) of a 2-D `shape`, a pure function of `seed` (2 ints).

    Each element hashes (seed, row, column) with the murmur3 32-bit finaliser; ops only,
    so it runs inside `tf.function` and `jax.jit` loops on any backend.
    """
    rows = ops.cast(ops.arange(shape[0]), "uint32")[:, None]
    columns = ops.cast(ops.arange(shape[1]), "uint32")[None, :]
    seed = ops.cast(seed, "uint32")
    h = columns + rows * _uint32(0x9E3779B1) + seed[0] * _uint32(0x85EBCA77)
    h = ops.bitwise_xor(h, seed[1] * _uint32(0xC2B2AE3D))
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ops.bitwise_xor(h, ops.right_shift(h, _uint32(shift)))
        h = h * _uint32(multiplier)
    h = ops.bitwise_xor(h, ops.right_shift(h, _uint32(16)))
    # The top 24 bits, centred in their bin: never exactly 0 or 1.
    return (ops.cast(ops.right_shift(h, _uint32(8)), "float32") + 0.5) * (1.0 / (1 << 24))


def generate(
    adapter: DecoderAdapter,
    prompt,
    max_new_tokens: int,
    policy: ExitPolicy | None = None,
    sampling: str = "greedy",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token_ids=(),
    seed: int = 0,
    return_state: bool = False,
    padding_mask=None,
    new_token_limit=None,
):
    """Generates up to `max_new_tokens` per row with one compiled-friendly loop.

    The loop is an `ops.while_loop` (no per-token Python), so it compiles whole under
    `tf.function` (see `tf_decode.py`) and `jax.jit`.

    Args:
        adapter: the model (`DecoderAdapter.from_gpt(model)`).
        prompt: int `(batch, prompt_length)`. Prompts of different lengths are
            left-padded, with `padding_mask` (`pad_prompts` makes both).
        max_new_tokens: int > 0.
        policy: the exit policy; default: full depth.
        sampling: `"greedy"` or `"sample"` (with `temperature`, `top_k`, `top_p`).
        stop_token_ids: rows stop after emitting one of these; later slots hold the
            first stop id.
        seed: int, sampling seed.
        return_state: also return a dict with `caches`, `lazy` (state), `next_position`
            (the first position not yet fed), `steps` (decode steps run: one per token
            but the last) and `layers_run` (layers summed over those steps).
        padding_mask: optional `(batch, prompt_length)`, 1/True for real tokens, 0 for
            left padding. None: every prompt token is real.
        new_token_limit: None, or an int scalar tensor in `[1, max_new_tokens]`: stop
            after that many tokens (a serving graph's input; `max_new_tokens` then sizes
            the buffers). Later columns hold the stop fill and exit layer 0. Not checked
            here: the caller asserts its range (`toex_tf.export` does).

    Returns:
        `(token_ids (batch, max_new_tokens), exit_layers (batch, max_new_tokens))`;
        exit layers are 1-based, 0 after a row stopped.
    """
    policy = policy or ExitPolicy()
    adapter.decision_layers(policy)  # checks the policy against the model
    prompt = _validate(
        adapter, prompt, max_new_tokens, sampling, temperature, top_k, top_p, padding_mask
    )
    prompt = ops.cast(ops.convert_to_tensor(prompt), "int32")
    batch, prompt_length = ops.shape(prompt)[0], ops.shape(prompt)[1]
    extra = policy.max_pending if policy.mode == "lazy" else 0
    caches = adapter.empty_caches(batch, extra)
    padding = None
    if padding_mask is not None:
        padding = padding_state(padding_mask, adapter.max_length + extra)
    logits, caches = prefill(adapter, prompt, caches, padding)
    lazy = ()
    if policy.mode == "lazy":
        hidden_dim = adapter.output_embedding.hidden_dim
        lazy = adapter.empty_lazy_state(batch, prompt_length, extra, hidden_dim)
    stop_ids = ops.convert_to_tensor(list(stop_token_ids) or [-1], "int32")
    fill = stop_ids[0] if stop_token_ids else ops.zeros((), "int32")
    tokens = ops.zeros((batch, max_new_tokens), "int32")
    exits = ops.zeros((batch, max_new_tokens), "int32")
    finished = ops.zeros((batch,), "bool")
    last_exit = ops.full((batch,), adapter.num_layers, "int32")

    def emit(step, tokens, exits, finished, logits, last_exit):
        """Samples the token of column `step` from `logits` and records it."""
        step_seed = ops.stack([ops.cast(seed, "int32"), ops.cast(step, "int32")])
        next_ids = sample_next(logits, sampling, temperature, top_k, top_p, seed=step_seed)
        next_ids = ops.where(finished, fill, next_ids)
        column = ops.one_hot(step, max_new_tokens, dtype="int32")[None, :]
        tokens = tokens * (1 - column) + next_ids[:, None] * column
        exits = exits * (1 - column) + ops.where(finished, 0, last_exit)[:, None] * column
        stopped = ops.any(ops.equal(next_ids[:, None], stop_ids[None, :]), axis=-1)
        return next_ids, tokens, exits, ops.logical_or(finished, stopped)

    # The loop runs one decode step per token but the last: the last token is sampled
    # after it, so no step computes logits that nobody reads.
    def condition(step, tokens, exits, finished, logits, last_exit, caches, lazy, layers_run):
        return ops.logical_and(step < limit - 1, ops.logical_not(ops.all(finished)))

    def body(step, tokens, exits, finished, logits, last_exit, caches, lazy, layers_run):
        next_ids, tokens, exits, finished = emit(step, tokens, exits, finished, logits, last_exit)
        logits, last_exit, caches, lazy, depth = decode_step(
            adapter, policy, next_ids[:, None], prompt_length + step, caches, lazy, padding
        )
        layers_run = layers_run + depth
        return (
            step + 1,
            tokens,
            exits,
            finished,
            logits,
            last_exit,
            tuple(caches),
            lazy,
            layers_run,
        )

    limit = max_new_tokens if new_token_limit is None else ops.cast(new_token_limit, "int32")
    zero = ops.zeros((), "int32")
    state = (zero, tokens, exits, finished, logits, last_exit, tuple(caches), lazy, zero)
    state = ops.while_loop(condition, body, state)
    steps = state[0]
    _, tokens, exits, _ = emit(steps, state[1], state[2], state[3], state[4], state[5])
    # Columns after the last one sampled (all rows stopped early) hold the stop id.
    after = ops.arange(max_new_tokens, dtype="int32")[None, :] > steps
    tokens = ops.where(after, fill, tokens)
    exits = ops.where(after, 0, exits)
    if return_state:
        extras = {
            "caches": list(state[6]),
            "lazy": state[7],
            "next_position": prompt_length + steps,
            "steps": steps,
            "layers_run": state[8],
        }
        return tokens, exits, extras
    return tokens, exits


def _validate(
    adapter, prompt, max_new_tokens, sampling, temperature, top_k, top_p, padding_mask=None
):
    """Checks generation arguments at the boundary; returns the prompt as an array."""
    if isinstance(prompt, (list, tuple)):
        lengths = (
            sorted({len(row) for row in prompt})
            if all(isinstance(row, (list, tuple, np.ndarray)) for row in prompt)
            else []
        )
        if len(lengths) > 1 and padding_mask is None:
            raise ValueError(
                f"prompt rows have different lengths {lengths} and no padding_mask was "
                f"given: left-pad them with toex_tf.inference.pad_prompts(prompts), which "
                f"returns the prompt and its padding_mask."
            )
        prompt = np.asarray(prompt)
    shape = tuple(prompt.shape)
    if len(shape) != 2:
        raise ValueError(f"prompt must be (batch, length) token ids; got shape {shape}.")
    if shape[1] == 0:
        raise ValueError("prompt is empty: give at least one token.")
    dtype = str(getattr(prompt, "dtype", ""))
    if dtype and "int" not in dtype:
        raise TypeError(f"prompt must hold integer token ids; got dtype {dtype}.")
    concrete = _concrete(prompt)
    if concrete is not None and concrete.size:
        low, high = int(concrete.min()), int(concrete.max())
        if low < 0 or high >= adapter.vocab_size:
            raise ValueError(
                f"prompt ids must be in [0, {adapter.vocab_size}) (the vocabulary); got ids "
                f"from {low} to {high}."
            )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise TypeError(f"max_new_tokens must be an int; got {max_new_tokens!r}.")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be > 0; got {max_new_tokens}.")
    if shape[1] is not None and shape[1] + max_new_tokens > adapter.max_length:
        raise ValueError(
            f"prompt length {shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_length={adapter.max_length}."
        )
    if sampling not in SAMPLING:
        raise ValueError(f"sampling must be one of {SAMPLING}; got {sampling!r}.")
    if temperature <= 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            f"need temperature > 0, top_k >= 0 and top_p in (0, 1]; got {temperature}, "
            f"{top_k}, {top_p}."
        )
    if padding_mask is not None:
        _validate_padding_mask(padding_mask, shape)
    return prompt


def _concrete(value):
    """`value` as a numpy array when it holds concrete values (not a traced tensor)."""
    try:
        return np.asarray(value)
    except Exception:  # noqa: BLE001 - symbolic tensors (tf.function, jax.jit) have no values
        return None


def _validate_padding_mask(padding_mask, prompt_shape):
    mask_shape = tuple(padding_mask.shape) if hasattr(padding_mask, "shape") else None
    if mask_shape is None:
        padding_mask = np.asarray(padding_mask)
        mask_shape = padding_mask.shape
    if tuple(mask_shape) != tuple(prompt_shape):
        raise ValueError(
            f"padding_mask must have the prompt's shape {tuple(prompt_shape)}; got "
            f"{tuple(mask_shape)}."
        )
    mask = _concrete(padding_mask)
    if mask is None:
        return
    mask = mask.astype(bool)
    if not mask[:, -1].all():
        raise ValueError(
            "padding_mask must mark left padding: every row's last prompt token must be real "
            f"(rows {np.flatnonzero(~mask[:, -1]).tolist()} end in padding). Use pad_prompts."
        )
    # Left padding: once a row's real tokens start, they continue to the end.
    if (np.diff(mask.astype(int), axis=1) < 0).any():
        rows = np.flatnonzero((np.diff(mask.astype(int), axis=1) < 0).any(axis=1)).tolist()
        raise ValueError(
            f"padding_mask rows {rows} have padding between real tokens; only left padding "
            "is supported (pad_prompts makes it)."
        )
