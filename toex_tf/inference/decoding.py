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

Batch policy: a segment is skipped only when every row has exited; a row that exited
earlier keeps its early prediction but its state keeps going (exact K/V for it).
"""

from dataclasses import dataclass

import numpy as np
from keras import ops

from toex_tf.layers.causal_self_attention import write_kv_cache
from toex_tf.layers.top_k_confidence_gate import CRITERIA, TopKConfidenceGate, validate_threshold

DECODE_MODES = ("full", "unfrozen", "frozen", "lazy")
SAMPLING = ("greedy", "sample")


@dataclass(frozen=True)
class ExitPolicy:
    """How a decode step decides to exit.

    Attributes:
        mode: one of `DECODE_MODES`.
        criterion: one of `max_prob`, `margin`, `entropy`.
        threshold: float in [0, 1]; a row exits when its confidence is above it
            (1.0 never exits).
        max_pending: lazy mode: the catch-up window. At most `max_pending - 1` tokens
            wait for a layer; then the next token goes deep and computes them all.
        decision_layers: exits (1-based layers) where the step may decide; None: every
            exit of the model. Each decision is one data-dependent branch, which costs
            about a small layer on a GPU (DESIGN.md §4), so decide at a few exits there.
    """

    mode: str = "full"
    criterion: str = "max_prob"
    threshold: float = 1.0
    max_pending: int = 8
    decision_layers: tuple | None = None

    def __post_init__(self):
        if self.mode not in DECODE_MODES:
            raise ValueError(f"mode must be one of {DECODE_MODES}; got {self.mode!r}.")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}; got {self.criterion!r}.")
        validate_threshold(self.threshold)
        if (
            isinstance(self.max_pending, bool)
            or not isinstance(self.max_pending, int)
            or (self.max_pending < 2)
        ):
            raise ValueError(f"max_pending must be an int >= 2; got {self.max_pending!r}.")


class DecoderAdapter:
    """What the decode engine needs from a model.

    Args:
        embed: `embed(token_ids (batch, seq), start_index) -> (batch, seq, hidden)`.
        blocks: the model's `EarlyExitBlock`s in order; each wraps a `TransformerBlock`
            (its `attention_norm` and `self_attention.project_kv` serve the frozen mode).
        max_length: longest sequence (prompt + generated).
    """

    def __init__(self, embed, blocks, max_length: int):
        self.embed = embed
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

        def embed(token_ids, start_index):
            return positions(token_embedding(token_ids, mode="embed"), start_index=start_index)

        return cls(embed, model.blocks, model.gpt_config.max_length)

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    def decision_layers(self, policy: ExitPolicy) -> tuple:
        """The segment ends of a step: the policy's decision exits plus the final layer."""
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
        shape = (batch_size, 2, self.max_length + extra, self.kv_heads, self.head_dim)
        return [ops.zeros(shape, dtype) for _ in self.blocks]

    def empty_lazy_state(self, batch_size: int, prompt_length, extra: int, hidden_dim: int):
        """Lazy mode: per-position hidden states and per-layer fill pointers after prefill."""
        states = ops.zeros((batch_size, self.max_length + extra, hidden_dim))
        filled = ops.full((self.num_layers,), prompt_length, "int32")
        return states, filled


def prefill(adapter: DecoderAdapter, prompt, caches):
    """Runs the prompt through every layer, filling the caches at positions `[0, P)`.

    Returns:
        `(logits (batch, vocab) of the last prompt position at full depth, caches)`.
    """
    hidden = adapter.embed(prompt, 0)
    caches = list(caches)
    for index, block in enumerate(adapter.blocks):
        hidden, caches[index] = block.block(hidden, cache=caches[index], cache_update_index=0)
    logits = adapter.blocks[-1].exit_logits(hidden[:, -1:])
    return logits[:, 0], caches


def _run_layers(adapter, layers, hidden, caches, position):
    caches = list(caches)
    for index in layers:
        hidden, caches[index] = adapter.blocks[index].block(
            hidden, cache=caches[index], cache_update_index=position
        )
    return hidden, caches


def _propagate_kv(adapter, layers, hidden, caches, position):
    """Frozen mode: K/V of skipped layers projected from the exit hidden state (CALM)."""
    caches = list(caches)
    for index in layers:
        block = adapter.blocks[index].block
        key, value = block.self_attention.project_kv(
            block.attention_norm(hidden), start_index=position
        )
        caches[index] = write_kv_cache(caches[index], key, value, position)
    return caches


def _lazy_chunk(adapter, layers, caches, lazy, position, width):
    """Lazy mode: runs `layers` over the pending positions plus `position`, in one pass.

    Pending positions at a layer always form the run `[filled[l], position)`, so one
    static window of `width` positions from `filled[l]` covers them (the engine never
    lets more than `width - 1` pile up). Window slots past `position` compute garbage
    into cache slots that causal masking hides and later writes overwrite.
    """
    states, filled = lazy
    caches = list(caches)
    batch, hidden_dim = ops.shape(states)[0], ops.shape(states)[2]
    zero = ops.zeros((), "int32")
    for index in layers:
        start = filled[index]
        window = ops.slice(states, (zero, start, zero), (batch, width, hidden_dim))
        window, caches[index] = adapter.blocks[index].block(
            window, cache=caches[index], cache_update_index=start
        )
        states = ops.slice_update(states, (zero, start, zero), window)
    filled = _mark_filled(filled, layers, position)
    hidden = ops.slice(states, (zero, position, zero), (batch, 1, hidden_dim))
    return hidden, caches, (states, filled)


def _mark_filled(filled, layers, position):
    in_segment = ops.logical_and(
        ops.arange(ops.shape(filled)[0]) >= layers[0],
        ops.arange(ops.shape(filled)[0]) <= layers[-1],
    )
    return ops.where(in_segment, ops.cast(position, "int32") + 1, filled)


def _write_state(lazy, hidden, position):
    states, filled = lazy
    zero = ops.zeros((), "int32")
    states = ops.slice_update(states, (zero, ops.cast(position, "int32"), zero), hidden)
    return states, filled


def decode_step(adapter: DecoderAdapter, policy: ExitPolicy, token_ids, position, caches, lazy=()):
    """One token per row through the layers, with exits.

    Args:
        adapter: the model.
        policy: mode, criterion and threshold.
        token_ids: int `(batch, 1)`, the tokens at `position`.
        position: scalar, their absolute position.
        caches: one KV cache per layer (`max_length + policy.max_pending` long in lazy
            mode, see `empty_state`).
        lazy: lazy mode only: `(states, filled)`, each position's latest hidden state
            `(batch, max_length + max_pending, hidden)` and per-layer fill pointers
            `(layers,)`.

    Returns:
        `(logits (batch, vocab), exit_layer (batch,) int32, caches, lazy, depth)`: the
        logits of the exit each row took, its 1-based layer, the updated state, and how
        many layers this step ran (a lazy catch-up window counts as one pass per layer).
    """
    gate = TopKConfidenceGate(criterion=policy.criterion)
    hidden = adapter.embed(token_ids, position)
    batch = ops.shape(hidden)[0]
    num_layers = adapter.num_layers
    mode = policy.mode
    width = policy.max_pending
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
        lazy = _write_state(lazy, hidden, position)
        # Skipping now would leave `width` tokens pending at the deepest layer: go deep.
        force = ops.greater_equal(ops.cast(position, "int32") + 1 - lazy[1][-1], width)
    state = (hidden, list(caches), decided, exit_layer, chosen, lazy)
    start = 0
    for segment, end in enumerate(adapter.decision_layers(policy)):
        layers = list(range(start, end))
        block = adapter.blocks[end - 1]

        def compute(state, segment=segment, layers=layers, block=block, end=end):
            hidden, caches, decided, exit_layer, chosen, lazy = state
            if mode == "lazy" and segment > 0:
                pending = ops.cast(position, "int32") - lazy[1][layers[0]]

                def one_token(hidden=hidden, caches=caches, lazy=lazy):
                    hidden, caches = _run_layers(adapter, layers, hidden, caches, position)
                    lazy = _write_state(lazy, hidden, position)
                    return hidden, caches, (lazy[0], _mark_filled(lazy[1], layers, position))

                hidden, caches, lazy = ops.cond(
                    ops.equal(pending, 0),
                    one_token,
                    lambda: _lazy_chunk(adapter, layers, caches, lazy, position, width),
                )
            else:
                hidden, caches = _run_layers(adapter, layers, hidden, caches, position)
                if mode == "lazy":
                    lazy = _write_state(lazy, hidden, position)
                    lazy = (lazy[0], _mark_filled(lazy[1], layers, position))
            caches = list(caches)
            normed = block.exit_norm(hidden)
            if end == num_layers:
                chosen = ops.where(decided[:, None, None], chosen, normed)
                return hidden, caches, decided, exit_layer, chosen, lazy
            if mode == "full":
                return hidden, caches, decided, exit_layer, chosen, lazy
            cheap = block.output_embedding(normed, mode="cheap_logits")
            confidence = gate.confidence(cheap)[:, 0]
            newly = ops.logical_and(
                ops.greater(confidence, policy.threshold), ops.logical_not(decided)
            )
            chosen = ops.where(newly[:, None, None], normed, chosen)
            exit_layer = ops.where(newly, end, exit_layer)
            return hidden, caches, ops.logical_or(decided, newly), exit_layer, chosen, lazy

        def skip(state, layers=layers):
            hidden, caches, decided, exit_layer, chosen, lazy = state
            if mode == "frozen":
                caches = _propagate_kv(adapter, layers, hidden, caches, position)
            return hidden, list(caches), decided, exit_layer, chosen, lazy

        if segment > 0 and mode in ("frozen", "lazy"):
            can_skip = ops.logical_and(ops.all(state[2]), ops.logical_not(force))
            state = ops.cond(
                can_skip,
                lambda state=state, skip=skip: skip(state),
                lambda state=state, compute=compute: compute(state),
            )
        else:
            state = compute(state)
        state = (state[0], list(state[1]), *state[2:])
        start = end
    hidden, caches, decided, exit_layer, chosen, lazy = state
    logits = adapter.output_embedding(chosen, mode="logits")
    # Layers this step ran: skipping starts once the last row has exited (batch policy),
    # unless lazy mode had to go deep to bound the pending work.
    depth = ops.full((), num_layers, "int32")
    if mode in ("frozen", "lazy"):
        depth = ops.where(force, depth, ops.max(exit_layer))
    return logits[:, 0], exit_layer, caches, lazy, depth


def flush_lazy(adapter: DecoderAdapter, policy: ExitPolicy, caches, lazy, next_position):
    """Lazy mode: computes every pending position (below `next_position`) at every layer.

    After it, each layer's cache at positions `< next_position` is exact.
    """
    caches = list(caches)
    position = ops.cast(next_position, "int32") - 1
    for index in range(adapter.num_layers):
        _, caches, lazy = _lazy_chunk(adapter, [index], caches, lazy, position, policy.max_pending)
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
):
    """Generates up to `max_new_tokens` per row with one compiled-friendly loop.

    The loop is an `ops.while_loop` (no per-token Python), so it compiles whole under
    `tf.function` (see `tf_decode.py`) and `jax.jit`.

    Args:
        adapter: the model (`DecoderAdapter.from_gpt(model)`).
        prompt: int `(batch, prompt_length)`; every row has the same length.
        max_new_tokens: int > 0.
        policy: the exit policy; default: full depth.
        sampling: `"greedy"` or `"sample"` (with `temperature`, `top_k`, `top_p`).
        stop_token_ids: rows stop after emitting one of these; later slots hold the
            first stop id.
        seed: int, sampling seed.
        return_state: also return a dict with `caches`, `lazy` (state), `next_position`
            (the first position not yet fed), `steps` (decode steps run: one per token
            but the last) and `layers_run` (layers summed over those steps).

    Returns:
        `(token_ids (batch, max_new_tokens), exit_layers (batch, max_new_tokens))`;
        exit layers are 1-based, 0 after a row stopped.
    """
    policy = policy or ExitPolicy()
    _validate(adapter, prompt, max_new_tokens, sampling, temperature, top_k, top_p)
    prompt = ops.cast(ops.convert_to_tensor(prompt), "int32")
    batch, prompt_length = ops.shape(prompt)[0], ops.shape(prompt)[1]
    extra = policy.max_pending if policy.mode == "lazy" else 0
    caches = adapter.empty_caches(batch, extra)
    logits, caches = prefill(adapter, prompt, caches)
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
        return ops.logical_and(step < max_new_tokens - 1, ops.logical_not(ops.all(finished)))

    def body(step, tokens, exits, finished, logits, last_exit, caches, lazy, layers_run):
        next_ids, tokens, exits, finished = emit(step, tokens, exits, finished, logits, last_exit)
        logits, last_exit, caches, lazy, depth = decode_step(
            adapter, policy, next_ids[:, None], prompt_length + step, caches, lazy
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


def _validate(adapter, prompt, max_new_tokens, sampling, temperature, top_k, top_p):
    shape = tuple(prompt.shape)
    if len(shape) != 2:
        raise ValueError(f"prompt must be (batch, length) token ids; got shape {shape}.")
    if shape[1] == 0:
        raise ValueError("prompt is empty: give at least one token.")
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
