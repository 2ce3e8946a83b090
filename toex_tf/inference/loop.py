"""`generate`: the compiled-friendly decode loop (prefill, then one `while_loop`).

The loop runs one `decode_step` per token but the last, with no per-token Python, so it
compiles whole under `tf.function` and `jax.jit` (`toex_tf.inference.compiled`).
"""

from keras import ops

from toex_tf.inference.modes import empty_lazy_state
from toex_tf.inference.policy import ExitPolicy
from toex_tf.inference.prompts import padding_state, validate_generation
from toex_tf.inference.sampling import sample_next
from toex_tf.inference.step import decode_step, prefill


def generate(
    adapter,
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
    trace: int = 0,
):
    """Generates up to `max_new_tokens` per row with one compiled-friendly loop.

    The loop is an `ops.while_loop` (no per-token Python), so it compiles whole under
    `tf.function` and `jax.jit` (`toex_tf.inference.compiled`).

    Args:
        adapter: the model (`DecoderAdapter(model)`).
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
        trace: int, 0 (the default) or the number of top alternatives to record: then
            the result also holds what a report shows (see Returns). Full mode and the
            default graph carry nothing extra.

    Returns:
        `(token_ids (batch, max_new_tokens), exit_layers (batch, max_new_tokens))`;
        exit layers are 1-based, 0 after a row stopped. With `trace`, a third element
        (before the state dict of `return_state`): `{"confidences": (batch,
        max_new_tokens, decisions)` float32, each decision exit's criterion value for
        that token (NaN where it was not computed: a skipped segment, or the first
        token, which the prompt's full-depth pass predicts), `"top_ids"` and
        `"top_probs"`: `(batch, max_new_tokens, trace)`, the most likely tokens of the
        logits each token was sampled from (the exit it took) and their probabilities}.
    """
    policy = policy or ExitPolicy()
    ends = adapter.decision_layers(policy)  # also checks the policy against the model
    prompt = validate_generation(
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
        lazy = empty_lazy_state(adapter, batch, prompt_length, extra)
    stop_ids = ops.convert_to_tensor(list(stop_token_ids) or [-1], "int32")
    fill = stop_ids[0] if stop_token_ids else ops.zeros((), "int32")
    tokens = ops.zeros((batch, max_new_tokens), "int32")
    exits = ops.zeros((batch, max_new_tokens), "int32")
    finished = ops.zeros((batch,), "bool")
    last_exit = ops.full((batch,), adapter.num_layers, "int32")
    decisions = len(ends) - 1 if policy.mode != "full" else 0  # the trace's columns
    traced = ()
    if trace:
        traced = (
            ops.full((batch, max_new_tokens, decisions), float("nan"), "float32"),
            ops.zeros((batch, max_new_tokens, trace), "int32"),
            ops.zeros((batch, max_new_tokens, trace), "float32"),
        )

    def record(step, traced, logits, confidences=None):
        """Writes column `step` of the trace: the top alternatives of `logits`, or
        (with `confidences`) the decision exits' confidences."""
        confidence_table, top_ids, top_probs = traced
        column = ops.equal(ops.arange(max_new_tokens), step)[None, :, None]
        if confidences is not None:
            confidence_table = ops.where(column, confidences[:, None, :], confidence_table)
            return confidence_table, top_ids, top_probs
        probs = ops.softmax(ops.cast(logits, "float32"), axis=-1)
        values, indices = ops.top_k(probs, trace)
        top_ids = ops.where(column, ops.cast(indices, "int32")[:, None, :], top_ids)
        top_probs = ops.where(column, values[:, None, :], top_probs)
        return confidence_table, top_ids, top_probs

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
    def condition(step, tokens, exits, finished, logits, last_exit, caches, lazy, layers_run, *_):
        return ops.logical_and(step < limit - 1, ops.logical_not(ops.all(finished)))

    def body(step, tokens, exits, finished, logits, last_exit, caches, lazy, layers_run, *traced):
        if traced:
            traced = record(step, traced, logits)
        next_ids, tokens, exits, finished = emit(step, tokens, exits, finished, logits, last_exit)
        logits, last_exit, caches, lazy, depth, *confidences = decode_step(
            adapter,
            policy,
            next_ids[:, None],
            prompt_length + step,
            caches,
            lazy,
            padding,
            trace=bool(traced) and decisions > 0,
        )
        if confidences:
            traced = record(step + 1, traced, None, confidences[0])
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
            *traced,
        )

    limit = max_new_tokens if new_token_limit is None else ops.cast(new_token_limit, "int32")
    zero = ops.zeros((), "int32")
    state = (zero, tokens, exits, finished, logits, last_exit, tuple(caches), lazy, zero, *traced)
    state = ops.while_loop(condition, body, state)
    steps = state[0]
    _, tokens, exits, _ = emit(steps, state[1], state[2], state[3], state[4], state[5])
    outputs = (tokens, exits)
    if trace:
        table, top_ids, top_probs = record(steps, state[9:], state[4])
        after_steps = ops.arange(max_new_tokens, dtype="int32")[None, :, None] > steps
        outputs += (
            {
                "confidences": table,
                "top_ids": ops.where(after_steps, 0, top_ids),
                "top_probs": ops.where(after_steps, 0.0, top_probs),
            },
        )
    # Columns after the last one sampled (all rows stopped early) hold the stop id.
    after = ops.arange(max_new_tokens, dtype="int32")[None, :] > steps
    outputs = (ops.where(after, fill, tokens), ops.where(after, 0, exits), *outputs[2:])
    if return_state:
        extras = {
            "caches": list(state[6]),
            "lazy": state[7],
            "next_position": prompt_length + steps,
            "steps": steps,
            "layers_run": state[8],
        }
        return (*outputs, extras)
    return outputs
