"""Teacher forcing through the decode loop: each mode's own caches, the true token fed.

`teacher_forced` runs `decode_step` over a window one position at a time while feeding
the *true* next token, so the logits and exit layers at each position are exactly those
the mode's `generate` would produce on that text. It serves the SavedModel's `score`
signature (`exit_logits`) and the quality measurement (`toex_tf.analysis.quality`).
The position loop is one `ops.while_loop`, so a window batch compiles into one program.
"""

import numpy as np
from keras import ops

from toex_tf.inference.adapter import DecoderAdapter
from toex_tf.inference.modes import empty_lazy_state, write_time_slice
from toex_tf.inference.policy import ExitPolicy
from toex_tf.inference.step import decode_step, prefill


def teacher_forced(adapter, policy, inputs, prefix_length, positions, write, outputs):
    """`policy`'s decode loop over `inputs` with the true token fed at every position.

    Prefills `inputs[:, :prefix_length]`, then runs `decode_step` for each position
    `t >= prefix_length` with token `inputs[:, t]`, carrying the mode's caches (and lazy
    state). `write(column, logits, exit_layer, depth, outputs) -> outputs` records each
    of the `positions` scored positions: column 0 is the prefill's last position (full
    depth), column `c` is position `prefix_length - 1 + c`. One `ops.while_loop`, so it
    compiles into one program; `positions` may be a tensor (a dynamic window length).

    Returns:
        The final `outputs`.
    """
    batch = ops.shape(inputs)[0]
    num_layers = adapter.num_layers
    extra = policy.max_pending if policy.mode == "lazy" else 0
    caches = adapter.empty_caches(batch, extra)
    logits, caches = prefill(adapter, inputs[:, :prefix_length], caches)
    lazy = ()
    if policy.mode == "lazy":
        lazy = empty_lazy_state(adapter, batch, prefix_length, extra)
    full_exit = ops.full((batch,), num_layers, "int32")
    zero = ops.zeros((), "int32")
    outputs = write(zero, logits, full_exit, ops.full((), num_layers, "int32"), outputs)

    def condition(column, caches, lazy, outputs):
        return column < positions

    def body(column, caches, lazy, outputs):
        position = prefix_length - 1 + column
        token_ids = ops.take(inputs, ops.reshape(position, (1,)), axis=1)
        logits, exit_layer, caches, lazy, depth = decode_step(
            adapter, policy, token_ids, position, list(caches), lazy
        )
        outputs = write(column, logits, exit_layer, ops.cast(depth, "int32"), outputs)
        return column + 1, tuple(caches), lazy, outputs

    one = ops.ones((), "int32")
    _, _, _, outputs = ops.while_loop(condition, body, (one, tuple(caches), lazy, outputs))
    return outputs


def exit_logits(adapter: DecoderAdapter, policy: ExitPolicy, inputs, prefix_length: int = 1):
    """The logits of the exit each position takes under `policy`, teacher-forced.

    `inputs[:, :prefix_length]` is prefilled at full depth (as `generate` prefills a
    prompt); each later position `t` runs `decode_step` on the true token `inputs[:, t]`
    with the mode's own caches. So with `prefix_length` = the prompt's length, the logits
    and exit layers are exactly those `generate` produces when it emits the rest of
    `inputs`. With the default 1, the whole window is scored under the mode (the
    SavedModel export's `score` signature). The window length may be dynamic.

    Args:
        adapter: the model.
        policy: the exit policy.
        inputs: int `(batch, length)` token ids, `1 <= length <= adapter.max_length`.
        prefix_length: int in `[1, length]`, defaults to 1.

    Returns:
        `(logits, exit_layer)` for positions `prefix_length - 1 .. length - 1`: float32
        `(batch, length - prefix_length + 1, vocab)`, the logits of the next token after
        each position, and int32 `(batch, length - prefix_length + 1)` 1-based exit
        layers (the first position's is the prefill's: full depth).
    """
    inputs = inputs if hasattr(inputs, "shape") else np.asarray(inputs)
    if len(inputs.shape) != 2:
        raise ValueError(f"inputs must be (batch, length) token ids; got shape {inputs.shape}.")
    length = inputs.shape[1]
    if length is not None and not 1 <= length <= adapter.max_length:
        raise ValueError(
            f"window length must be in [1, max_length={adapter.max_length}]; got {length}."
        )
    if isinstance(prefix_length, bool) or not isinstance(prefix_length, (int, np.integer)):
        raise TypeError(f"prefix_length must be an int; got {prefix_length!r}.")
    if prefix_length < 1 or (length is not None and prefix_length > length):
        raise ValueError(f"prefix_length must be in [1, window length]; got {prefix_length}.")
    inputs = ops.cast(ops.convert_to_tensor(inputs), "int32")
    batch, length = ops.shape(inputs)[0], ops.shape(inputs)[1]
    vocab = adapter.vocab_size

    def write(column, logits, exit_layer, depth, outputs):
        buffer, exits = outputs
        buffer = write_time_slice(buffer, column, ops.cast(logits, "float32")[:, None])
        return buffer, write_time_slice(exits, column, exit_layer[:, None])

    positions = length - prefix_length + 1
    outputs = (
        ops.zeros((batch, positions, vocab), "float32"),
        ops.zeros((batch, positions), "int32"),
    )
    return teacher_forced(adapter, policy, inputs, prefix_length, positions, write, outputs)
