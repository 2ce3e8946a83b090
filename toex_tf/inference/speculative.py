"""Self-speculative decoding: draft with the first k layers, verify with the full model.

Each round drafts `draft_length` tokens greedily from the exit at layer k (its K/V in
layers 1..k are exactly the full model's, since the draft *is* the bottom of the full
model), then runs the drafted positions through layers k+1..L in one windowed pass.
The longest prefix on which the draft agrees with the full model's greedy choice is
kept, plus the full model's token at the first disagreement. The output is therefore
exactly full-depth greedy decoding (LayerSkip), at fewer sequential layer passes when
drafts are accepted. The loop is one `ops.while_loop`; rounds advance all rows by the
batch's smallest accepted length, which keeps every row exact.
"""

from keras import ops

from toex_tf.inference.modes import write_time_slice
from toex_tf.inference.prompts import padding_state, validate_generation
from toex_tf.inference.step import prefill


def generate_speculative(
    adapter,
    prompt,
    max_new_tokens: int,
    draft_layer: int,
    draft_length: int = 4,
    return_state: bool = False,
    padding_mask=None,
    stop_token_ids=(),
):
    """Greedy generation, identical to full depth, with self-speculative drafts.

    Args:
        adapter: the model.
        prompt: int `(batch, prompt_length)`.
        max_new_tokens: int > 0.
        draft_layer: 1-based exit layer that drafts (it must carry an exit head).
        draft_length: drafted tokens per round, >= 1.
        return_state: also return a dict with `rounds` and `accepted` (drafts kept).
        padding_mask: optional `(batch, prompt_length)` of a left-padded batch (see
            `generate`).
        stop_token_ids: rows stop after emitting one of these; later slots hold the
            first stop id and exit layer 0 (as in `generate`). The loop ends when every
            row has stopped.

    Returns:
        `(token_ids, exit_layers)`, each `(batch, max_new_tokens)`: the exit layer is
        the draft layer for accepted drafts and the final layer for full-model tokens.
    """
    if draft_layer not in adapter.exit_layers or draft_layer >= adapter.num_layers:
        raise ValueError(
            f"draft_layer must be an exit below the final layer, one of "
            f"{list(adapter.exit_layers[:-1])}; got {draft_layer}."
        )
    if isinstance(draft_length, bool) or not isinstance(draft_length, int) or draft_length < 1:
        raise ValueError(f"draft_length must be an int >= 1; got {draft_length!r}.")
    prompt = validate_generation(
        adapter, prompt, max_new_tokens, "greedy", 1.0, 0, 1.0, padding_mask
    )
    prompt = ops.cast(ops.convert_to_tensor(prompt), "int32")
    batch, prompt_length = ops.shape(prompt)[0], ops.shape(prompt)[1]
    num_layers = adapter.num_layers
    width = draft_length
    caches = adapter.empty_caches(batch, extra=width + 1)
    padding = None
    if padding_mask is not None:
        padding = padding_state(padding_mask, adapter.max_length + width + 1)
    logits, caches = prefill(adapter, prompt, caches, padding)
    first = ops.cast(ops.argmax(logits, axis=-1), "int32")[:, None]
    tokens = ops.zeros((batch, max_new_tokens + width), "int32")
    exits = ops.zeros((batch, max_new_tokens + width), "int32")
    zero = ops.zeros((), "int32")
    tokens = write_time_slice(tokens, zero, first)
    exits = write_time_slice(exits, zero, ops.full((batch, 1), num_layers, "int32"))
    draft_block = adapter.blocks[draft_layer - 1]
    upper = range(draft_layer, num_layers)
    offsets = ops.arange(width, dtype="int32")[None, :]
    stop_ids = ops.convert_to_tensor(list(stop_token_ids) or [-1], "int32")

    def is_stop(ids):
        return ops.any(ops.equal(ids[..., None], stop_ids), axis=-1)

    def condition(produced, current, position, tokens, exits, caches, rounds, accepted, finished):
        return ops.logical_and(produced < max_new_tokens, ops.logical_not(ops.all(finished)))

    def body(produced, current, position, tokens, exits, caches, rounds, accepted, finished):
        caches = list(caches)
        drafts, states = [], []
        token = current
        for step in range(width):
            hidden = adapter.embed(token, position + step, padding)
            for index in range(draft_layer):
                hidden, caches[index] = adapter.run_block(
                    index, hidden, caches, position + step, padding
                )
            states.append(hidden)
            token = ops.cast(ops.argmax(draft_block.exit_logits(hidden)[:, 0], -1), "int32")
            token = token[:, None]
            drafts.append(token)
        drafts = ops.concatenate(drafts, axis=1)  # predictions for position + 1 ..
        hidden = ops.concatenate(states, axis=1)  # layer-k states of position ..
        for index in upper:
            hidden, caches[index] = adapter.run_block(index, hidden, caches, position, padding)
        verified = ops.cast(ops.argmax(adapter.blocks[-1].exit_logits(hidden), -1), "int32")
        agree = ops.cast(ops.equal(drafts, verified), "int32")
        kept = ops.min(ops.sum(ops.cumprod(agree, axis=1), axis=1))  # batch-wide prefix
        count = ops.minimum(kept + 1, width)
        emitted = ops.where(offsets < kept, drafts, verified)
        layers = ops.where(offsets < kept, draft_layer, num_layers)
        layers = ops.broadcast_to(layers, ops.shape(emitted))
        start = produced
        tokens = write_time_slice(tokens, start, emitted)
        exits = write_time_slice(exits, start, ops.cast(layers, "int32"))
        current = ops.take_along_axis(
            emitted, ops.broadcast_to(ops.reshape(count - 1, (1, 1)), (batch, 1)), axis=1
        )
        finished = ops.logical_or(
            finished, ops.any(ops.logical_and(is_stop(emitted), offsets < count), axis=1)
        )
        return (
            produced + count,
            current,
            position + count,
            tokens,
            exits,
            tuple(caches),
            rounds + 1,
            accepted + kept,
            finished,
        )

    one = ops.ones((), "int32")
    finished = is_stop(first[:, 0])
    state = (one, first, prompt_length, tokens, exits, tuple(caches), zero, zero, finished)
    state = ops.while_loop(condition, body, state)
    token_ids = state[3][:, :max_new_tokens]
    exit_layers = state[4][:, :max_new_tokens]
    # As in `generate`: after a row's first stop token (and past the last column
    # produced, when every row stopped early), the stop id and exit layer 0.
    stops = ops.cast(is_stop(token_ids), "int32")
    columns = ops.arange(max_new_tokens, dtype="int32")[None, :]
    after = ops.logical_or(ops.cumsum(stops, axis=1) - stops > 0, columns >= state[0])
    if stop_token_ids:
        token_ids = ops.where(after, stop_ids[0], token_ids)
    exit_layers = ops.where(after, 0, exit_layers)
    if return_state:
        return token_ids, exit_layers, {"rounds": state[6], "accepted": state[7]}
    return token_ids, exit_layers
