"""Teacher-forced quality of the decode modes: what each exit mode costs in perplexity.

`analysis/exit_eval.py` scores exits from one full-depth forward pass, which is the
quality of the `unfrozen` mode only. The cheaper modes change the state later tokens
see: in `frozen` mode a token that exits leaves projected (approximate) keys and values
in the layers it skipped, and every later token attends to them (DESIGN.md §3). So
here each window runs through the real decode loop, `decode_step` with the mode's own
caches, one position at a time, while the *true* next token is fed at every step
(teacher forcing). The logits of each step are scored against the window's target.

The position loop (`toex_tf.inference.teacher_forced`) is one `ops.while_loop`, so a
whole window batch compiles into one program (`compare_modes` does this).
"""

import numpy as np
from keras import ops

from toex_tf.inference.adapter import DecoderAdapter
from toex_tf.inference.compiled import compile_function
from toex_tf.inference.policy import ExitPolicy
from toex_tf.inference.teacher_forced import teacher_forced


def _validate(adapter: DecoderAdapter, inputs, targets, prefix_length: int) -> tuple:
    input_shape, target_shape = tuple(inputs.shape), tuple(targets.shape)
    if len(input_shape) != 2:
        raise ValueError(
            f"inputs must be (batch, length) token ids; got shape {input_shape}, expected rank 2."
        )
    if input_shape != target_shape:
        raise ValueError(
            f"targets must have the shape of inputs {input_shape}; got {target_shape}."
        )
    length = input_shape[1]
    if length is None:
        raise ValueError("inputs need a static window length; got shape (batch, None).")
    if length > adapter.max_length:
        raise ValueError(
            f"window length {length} exceeds the model's max_length={adapter.max_length}."
        )
    if isinstance(prefix_length, bool) or not isinstance(prefix_length, (int, np.integer)):
        raise TypeError(f"prefix_length must be an int; got {prefix_length!r}.")
    if not 1 <= prefix_length < length:
        raise ValueError(
            f"prefix_length must be in [1, window length) = [1, {length}); got {prefix_length}."
        )
    return input_shape[0], length


def score_decoding(
    adapter: DecoderAdapter, policy: ExitPolicy, inputs, targets, prefix_length: int = 1
) -> dict:
    """Teacher-forced scores of `policy`'s decode loop on a batch of LM windows.

    Prefills `inputs[:, :prefix_length]` (whose last position is scored at full depth),
    then feeds the true token `inputs[:, t]` at each position `t >= prefix_length`
    through `decode_step`, carrying the mode's caches (and lazy state) from step to
    step. Position `t` is scored against `targets[:, t]`.

    Args:
        adapter: the model (`DecoderAdapter(model)`).
        policy: the exit policy; its mode decides how caches are filled.
        inputs: int `(batch, length)` windows, `length <= adapter.max_length`.
        targets: int `(batch, length)`, the next token of each input position
            (`lm_windows` gives both).
        prefix_length: int in `[1, length)`, defaults to 1. Positions before
            `prefix_length - 1` are context only and are not scored.

    Returns:
        dict of tensors over the `length - prefix_length + 1` scored positions:
        `nll` float32 `(batch, positions)` (from a float32 log-softmax of the logits),
        `correct` float32 `(batch, positions)` (argmax equals the target),
        `exit_layer` int32 `(batch, positions)` (1-based) and `depth` int32
        `(positions,)`, the layers each step ran (the batch runs as one). The first
        position is the prefill's: full depth. `summarize_scores` turns them into
        perplexity, accuracy and exit figures.

    Example:
        >>> adapter = DecoderAdapter(build_gpt("tiny"))
        >>> scores = score_decoding(adapter, ExitPolicy("frozen", "max_prob", 0.5), x, y)
        >>> summarize_scores([scores], adapter.exit_layers)["perplexity"]
    """
    inputs = inputs if hasattr(inputs, "shape") else np.asarray(inputs)
    targets = targets if hasattr(targets, "shape") else np.asarray(targets)
    batch, length = _validate(adapter, inputs, targets, prefix_length)
    inputs = ops.cast(ops.convert_to_tensor(inputs), "int32")
    targets = ops.cast(ops.convert_to_tensor(targets), "int32")
    positions = length - prefix_length + 1

    def score(column, logits, exit_layer, depth, outputs):
        """Writes the scores of `logits` (position `prefix_length - 1 + column`)."""
        nll, correct, exits, depths = outputs
        position = prefix_length - 1 + column
        target = ops.take(targets, ops.reshape(position, (1,)), axis=1)[:, 0]
        log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
        target_nll = -ops.take_along_axis(log_probs, target[:, None], axis=-1)[:, 0]
        hit = ops.cast(ops.equal(ops.cast(ops.argmax(logits, axis=-1), "int32"), target), "float32")
        # Column writes with `where`, not arithmetic: an infinite NLL times a zero mask
        # would turn the other columns into NaN.
        here = ops.cast(ops.one_hot(column, positions), "bool")
        nll = ops.where(here[None, :], target_nll[:, None], nll)
        correct = ops.where(here[None, :], hit[:, None], correct)
        exits = ops.where(here[None, :], exit_layer[:, None], exits)
        depths = ops.where(here, depth, depths)
        return nll, correct, exits, depths

    outputs = (
        ops.zeros((batch, positions), "float32"),
        ops.zeros((batch, positions), "float32"),
        ops.zeros((batch, positions), "int32"),
        ops.zeros((positions,), "int32"),
    )
    nll, correct, exits, depths = teacher_forced(
        adapter, policy, inputs, prefix_length, positions, score, outputs
    )
    return {"nll": nll, "correct": correct, "exit_layer": exits, "depth": depths}


def summarize_scores(scores, exit_layers) -> dict:
    """Perplexity, accuracy and exit figures of one or more `score_decoding` results.

    Args:
        scores: a `score_decoding` dict, or a list of them (batches of windows).
        exit_layers: the model's exit layers (`adapter.exit_layers`), 1-based.

    Returns:
        dict: `perplexity` (exp of the mean NLL), `accuracy`, `avg_exit_layer`,
        `exit_distribution` (fraction of tokens per exit layer, keys are str),
        `avg_layers` (layers run per token, from each step's `depth`) and `tokens`.
    """
    if isinstance(scores, dict):
        scores = [scores]
    if not scores:
        raise ValueError("scores must hold at least one score_decoding result; got none.")
    nll = np.concatenate([np.asarray(s["nll"], "float64").ravel() for s in scores])
    correct = np.concatenate([np.asarray(s["correct"], "float64").ravel() for s in scores])
    exits = np.concatenate([np.asarray(s["exit_layer"]).ravel() for s in scores])
    # A step's depth is shared by every row of its batch.
    layers_run = sum(
        float(np.asarray(s["depth"], "float64").sum()) * np.asarray(s["nll"]).shape[0]
        for s in scores
    )
    tokens = int(nll.size)
    return {
        "perplexity": float(np.exp(nll.mean())),
        "accuracy": float(correct.mean()),
        "avg_exit_layer": float(exits.mean()),
        "exit_distribution": {
            str(layer): float((exits == layer).sum() / tokens) for layer in exit_layers
        },
        "avg_layers": layers_run / tokens,
        "tokens": tokens,
    }


def _scorer(adapter, policy, prefix_length, compile):
    def run(inputs, targets):
        return score_decoding(adapter, policy, inputs, targets, prefix_length)

    return compile_function(run) if compile else run


def compare_modes(
    adapter: DecoderAdapter,
    policies,
    inputs: np.ndarray,
    targets: np.ndarray,
    batch_size: int = 1,
    prefix_length: int = 1,
    compile: bool = True,
) -> dict:
    """Teacher-forced quality of full depth and of each policy on the same windows.

    Each policy runs over the windows in batches of `batch_size`. Batch size matters for
    `frozen` and `lazy`: a step skips layers only when every row of its batch has exited
    (the batch policy of `decode_step`), so larger batches skip less; at batch size 1
    each window decodes alone, as in latency-bound serving.

    Args:
        adapter: the model.
        policies: sequence of `ExitPolicy`.
        inputs: int `(windows, length)` array.
        targets: int `(windows, length)` array, the next tokens.
        batch_size: int > 0, defaults to 1. Windows per decode loop.
        prefix_length: int, defaults to 1, see `score_decoding`.
        compile: bool, defaults to True. Compile each policy's loop with `tf.function`
            (TensorFlow) or `jax.jit` (JAX); eager otherwise.

    Returns:
        `{"full": summary, "rows": [row, ...]}`: `summary` as in `summarize_scores`;
        each row has `mode`, `criterion`, `threshold`, `perplexity`, `accuracy`,
        `perplexity_increase` (relative to full: 0.021 is +2.1%), `accuracy_delta`,
        `avg_layers`, `avg_exit_layer` and `exit_distribution`.
    """
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    _validate(adapter, inputs, targets, prefix_length)
    if len(inputs) == 0:
        raise ValueError("inputs must hold at least one window; got 0.")
    if not np.issubdtype(inputs.dtype, np.integer) or not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(
            f"inputs and targets must be integer token ids; got {inputs.dtype} and {targets.dtype}."
        )
    vocab = adapter.output_embedding.vocab_size
    low, high = min(inputs.min(), targets.min()), max(inputs.max(), targets.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"token ids must be in [0, vocab_size={vocab}); got [{low}, {high}].")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}.")
    inputs, targets = inputs.astype("int32"), targets.astype("int32")

    def evaluate(policy):
        run = _scorer(adapter, policy, prefix_length, compile)
        scores = []
        for start in range(0, len(inputs), batch_size):
            out = run(inputs[start : start + batch_size], targets[start : start + batch_size])
            scores.append({k: ops.convert_to_numpy(v) for k, v in out.items()})
        return summarize_scores(scores, adapter.exit_layers)

    full = evaluate(ExitPolicy("full"))
    rows = []
    for policy in policies:
        summary = evaluate(policy)
        rows.append(
            {
                "mode": policy.mode,
                "criterion": getattr(policy, "criterion", None),
                "threshold": getattr(policy, "threshold", None),
                "perplexity": summary["perplexity"],
                "accuracy": summary["accuracy"],
                "perplexity_increase": summary["perplexity"] / full["perplexity"] - 1.0,
                "accuracy_delta": summary["accuracy"] - full["accuracy"],
                "avg_layers": summary["avg_layers"],
                "avg_exit_layer": summary["avg_exit_layer"],
                "exit_distribution": summary["exit_distribution"],
            }
        )
    return {"full": full, "rows": rows}
