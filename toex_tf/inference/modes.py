"""What each exit mode does with the layers a token skips, and lazy mode's bookkeeping.

    unfrozen  nothing is skipped: `run_layers`.
    frozen    K/V of the skipped layers are projected from the exit hidden state
              (`propagate_kv`, CALM state propagation). Not exact.
    lazy      the skipped layers are deferred. Lazy state is `(states, filled)`: the
              hidden state each pending position stopped at, `(batch, max_length +
              max_pending, hidden)`, and per-layer fill pointers `(layers,)` (positions
              below `filled[l]` have exact K/V at layer `l`). The next token that goes
              deep catches every pending position up in one windowed pass (`lazy_chunk`,
              FREE, EE-LLM); `flush_lazy` catches up everything.

All of it lives here, so the decode step (`toex_tf.inference.step`) only chooses a
branch per segment.
"""

from keras import ops

from toex_tf.layers.causal_self_attention import write_kv_cache


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


def copy_caches(caches):
    """A shallow copy of a cache container: a list of every layer's cache, or a dict of
    the caches a segment touches (so a segment's `cond` carries only those)."""
    return dict(caches) if isinstance(caches, dict) else list(caches)


def run_layers(adapter, layers, hidden, caches, position, padding):
    caches = copy_caches(caches)
    for index in layers:
        hidden, caches[index] = adapter.run_block(index, hidden, caches, position, padding)
    return hidden, caches


def propagate_kv(adapter, layers, hidden, caches, position):
    """Frozen mode: K/V of skipped layers projected from the exit hidden state (CALM)."""
    caches = copy_caches(caches)
    for index in layers:
        block = adapter.blocks[index].block
        key, value = block.self_attention.project_kv(
            block.attention_norm(hidden), start_index=position
        )
        caches[index] = write_kv_cache(caches[index], key, value, position)
    return caches


def lazy_chunk(
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
    caches = copy_caches(caches)
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
        window, caches[index] = adapter.run_block(index, window, caches, start, padding)
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


def write_lazy_state(lazy, hidden, position):
    states, filled = lazy
    return write_time_slice(states, position, hidden), filled


def flush_lazy(adapter, policy, caches, lazy, next_position, padding=None):
    """Lazy mode: computes every pending position (below `next_position`) at every layer.

    After it, each layer's cache at positions `< next_position` is exact.
    """
    caches = list(caches)
    position = ops.cast(next_position, "int32") - 1
    for index in range(adapter.num_layers):
        _, caches, lazy = lazy_chunk(
            adapter, [index], caches, lazy, position, policy.max_pending, padding
        )
    return caches, lazy


def empty_lazy_state(adapter, batch_size: int, prompt_length, extra: int):
    """Lazy state after prefill: no pending position, every layer filled to the prompt."""
    states = ops.zeros((batch_size, adapter.max_length + extra, adapter.hidden_dim))
    filled = ops.full((adapter.num_layers,), prompt_length, "int32")
    return states, filled
