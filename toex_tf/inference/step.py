"""One decode step with exits, and the prefill that starts a generation.

A decode step runs the layers in *segments* that end at decision exits. After a segment,
the exit's cheap head (`LightweightOutputEmbedding` shortlist or low-rank) feeds the
policy's criterion (`toex_tf.inference.criteria`); the full vocabulary head runs once,
on the normed hidden state of the exit each row took. Decisions happen at segment ends
only: on a GPU a data-dependent branch costs about as much as a small layer (DESIGN.md
§4). What a skipped segment does depends on the mode (`toex_tf.inference.modes`).

Batch policy: a segment is skipped only when every row has exited; a row that exited
earlier keeps its early prediction but its state keeps going (exact K/V for it).
"""

import functools

from keras import ops

from toex_tf.inference.branches import rarely_taken
from toex_tf.inference.criteria import (
    CHEAP_HEAD_CRITERIA,
    exit_confidence,
    initial_memory,
    passes,
)
from toex_tf.inference.modes import (
    copy_caches,
    lazy_chunk,
    propagate_kv,
    run_layers,
    write_lazy_state,
)


def prefill(adapter, prompt, caches, padding=None):
    """Runs the prompt through every layer, filling the caches at positions `[0, P)`.

    Args:
        padding: None, or `(key_mask, offsets)` from `padding_state`: a left-padded batch.

    Returns:
        `(logits (batch, vocab) of the last prompt position at full depth, caches)`.
    """
    hidden = adapter.embed(prompt, 0, padding)
    caches = list(caches)
    for index in range(adapter.num_layers):
        hidden, caches[index] = adapter.run_block(index, hidden, caches, 0, padding)
    logits = adapter.blocks[-1].exit_logits(hidden[:, -1:])
    return logits[:, 0], caches


def decode_step(
    adapter,
    policy,
    token_ids,
    position,
    caches,
    lazy=(),
    padding=None,
    trace: bool = False,
):
    """One token per row through the layers, with exits.

    Args:
        adapter: the model.
        policy: mode, criterion and threshold.
        token_ids: int `(batch, 1)`, the tokens at `position`.
        position: scalar, their absolute position (the column; shared by the batch).
        caches: one KV cache per layer (`max_length + policy.max_pending` long in lazy
            mode: `adapter.empty_caches(batch, policy.max_pending)`).
        lazy: lazy mode only: `(states, filled)` from `modes.empty_lazy_state`: the
            hidden state each pending position stopped at, `(batch, max_length +
            max_pending, hidden)`, and per-layer fill pointers `(layers,)` (positions
            below `filled[l]` have exact K/V at layer `l`).
        padding: None, or `(key_mask, offsets)` of a left-padded batch (`padding_state`).
        trace: bool, also return each decision exit's confidence (for reports; the
            default graph carries nothing extra).

    Returns:
        `(logits (batch, vocab), exit_layer (batch,) int32, caches, lazy, depth)`: the
        logits of the exit each row took, its 1-based layer, the updated state, and how
        many layers this step ran (a lazy catch-up window counts as one pass per layer).
        With `trace`, also `confidences (batch, decisions)` float32: the criterion's
        value at each non-final decision exit, NaN where the segment was skipped.
    """
    hidden = adapter.embed(token_ids, position, padding)
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
                "lazy mode needs its state: pass lazy=toex_tf.inference.modes."
                "empty_lazy_state(...) and caches with max_pending extra positions "
                "(generate does this)."
            )
        # Skipping now would leave `width` tokens pending at the deepest layer: go deep.
        force = ops.greater_equal(ops.cast(position, "int32") + 1 - lazy[1][-1], width)
    memory = initial_memory(policy.criterion, hidden)
    caches = list(caches)
    # Full depth decides nothing: one segment. Otherwise the shared cheap head is built
    # once per step, before the first layer, so no check waits for its gather.
    ends = (num_layers,) if mode == "full" else adapter.decision_layers(policy)
    cheap_head = None
    if mode != "full" and policy.criterion in CHEAP_HEAD_CRITERIA:
        cheap_head = adapter.output_embedding.cheap_head(hidden.dtype)
    state = (hidden, {}, decided, exit_layer, chosen, lazy, memory)
    decisions = len(ends) - 1
    if trace:  # NaN until a decision exit computes its confidence
        state += (ops.full((batch, decisions), float("nan"), "float32"),)
    start = 0
    for segment, end in enumerate(ends):
        layers = list(range(start, end))
        block = adapter.blocks[end - 1]
        # The segment's `cond` carries only the caches it writes: under XLA every operand
        # of a conditional that it returns is copied, and all layers' caches are large.
        state = (state[0], {index: caches[index] for index in layers}, *state[2:])

        def compute(state, segment=segment, layers=layers, block=block, end=end, chunk=False):
            hidden, caches, decided, exit_layer, chosen, lazy, memory, *traced = state
            if chunk:  # lazy: catch up the pending positions and this one in one window
                # After the final segment no later layer reads the states buffer.
                hidden, caches, lazy = lazy_chunk(
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
                hidden, caches = run_layers(adapter, layers, hidden, caches, position, padding)
            normed = block.exit_normed(hidden)
            if end == num_layers:
                chosen = ops.where(decided[:, None, None], chosen, normed)
                return hidden, caches, decided, exit_layer, chosen, lazy, memory, *traced
            if mode == "full":
                return hidden, caches, decided, exit_layer, chosen, lazy, memory, *traced
            shared = cheap_head if block.output_embedding is adapter.output_embedding else None
            confidence, memory = exit_confidence(
                policy, block, normed, hidden, memory, segment == 0, shared
            )
            newly = ops.logical_and(passes(confidence, threshold), ops.logical_not(decided))
            chosen = ops.where(newly[:, None, None], normed, chosen)
            exit_layer = ops.where(newly, end, exit_layer)
            decided = ops.logical_or(decided, newly)
            if traced:
                column = ops.equal(ops.arange(decisions), segment)[None, :]
                traced = [ops.where(column, ops.cast(confidence, "float32")[:, None], traced[0])]
            return hidden, caches, decided, exit_layer, chosen, lazy, memory, *traced

        def skip(state, layers=layers):
            hidden, caches, decided, exit_layer, chosen, lazy, memory, *traced = state
            if mode == "frozen":
                caches = propagate_kv(adapter, layers, hidden, caches, position)
            if mode == "lazy":  # the exit state: a later deep token catches it up from here
                lazy = write_lazy_state(lazy, hidden, position)
            return hidden, copy_caches(caches), decided, exit_layer, chosen, lazy, memory, *traced

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
            # The catch-up is rare (at most one step in `max_pending`): as a call it
            # costs nothing on the steps that do not take it.
            catch_up = rarely_taken(functools.partial(compute, chunk=True))
            state = ops.switch(branch, [skip, compute, catch_up], state)
        else:
            state = compute(state)
        for index in layers:
            caches[index] = state[1][index]
        start = end
    hidden, _, decided, exit_layer, chosen, lazy, _, *traced = state
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
    if trace:
        return logits[:, 0], exit_layer, caches, lazy, depth, traced[0]
    return logits[:, 0], exit_layer, caches, lazy, depth
