"""Exit criteria: the confidence signals, and THE place a token's exit is decided.

Every criterion maps to a confidence in [0, 1], so one threshold scale serves all. A
token exits when `passes(confidence, threshold)`: `confidence > threshold`, strictly, so
that `threshold=1.0` means "never exit" even for a saturated softmax. The decode step,
the `TopKConfidenceGate` layer, the teacher-forced exit sweep, the Llama evaluation and
every calibration call `passes`; nothing else compares a confidence with a threshold.

Criteria (`ExitPolicy.criterion`):
    max_prob, margin, entropy   the cheap head's softmax (`logit_confidence`): top-1
                probability; top-1 minus top-2 (ToEx); `1 - H(p) / log(V)`.
    kl          `exp(-KL(p_k || p_prev))` between the cheap-head distributions of this
                decision exit and the previous one: the prediction stopped moving. The
                first decision exit has no previous one and never passes.
    saturation  cosine between the hidden state here and at the previous decision exit
                (the embedding before the first): hidden-state saturation (CALM's
                "state" signal). No vocabulary projection at all.
    patience    `min(1, streak / patience)`, where streak counts the consecutive earlier
                decision exits whose cheap top-1 equals this one's (PABEE).
    learned     the exit block's `LearnedExitGate` on the normed hidden state (CALM's
                learned consistency classifier), no vocabulary projection.

This module needs Keras only (no TensorFlow) and imports nothing else of toex_tf but
`criteria_names` (the names and the threshold check), so the layers can use it too.
"""

import numpy as np
from keras import ops

from toex_tf.inference.criteria_names import (  # noqa: F401 - re-exported
    CHEAP_HEAD_CRITERIA,
    CRITERIA,
    DECODE_CRITERIA,
    validate_threshold,
)


def passes(confidence, threshold):
    """The exit decision: `confidence > threshold`, element-wise (bool).

    Strict, so a threshold of 1.0 never exits. Takes backend tensors or NumPy arrays
    (then it returns a NumPy array); `threshold` may be a scalar or broadcast.
    """
    if _is_numpy(confidence) and _is_numpy(threshold):
        return np.greater(confidence, threshold)
    return ops.greater(confidence, threshold)


def _is_numpy(value) -> bool:
    return isinstance(value, (np.ndarray, np.generic, int, float))


def first_passing(confidence, threshold, axis: int = 0) -> np.ndarray:
    """Index of the first exit whose confidence passes, per position (NumPy).

    Args:
        confidence: the confidences of the non-final exits in order along `axis`.
        threshold: float.
        axis: int, the exit axis. Defaults to `0`.

    Returns:
        int array without `axis`; the number of exits there (the final layer) where
        none passes.
    """
    passed = np.moveaxis(passes(np.asarray(confidence), threshold), axis, 0)
    passed = np.concatenate([passed, np.ones((1,) + passed.shape[1:], bool)])
    return np.argmax(passed, axis=0)


def logit_confidence(logits, criterion: str):
    """Float32 confidence in [0, 1] of `max_prob`, `margin` or `entropy` on logits.

    Computed in float32 whatever the dtype: a bf16 softmax loses the small top-1/top-2
    gaps these criteria threshold on.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}; got {criterion!r}.")
    logits = ops.cast(logits, "float32")
    if criterion == "entropy":
        log_probs = ops.log_softmax(logits, axis=-1)
        entropy = -ops.sum(ops.exp(log_probs) * log_probs, axis=-1)
        vocab = ops.cast(ops.shape(logits)[-1], "float32")
        return ops.clip(1.0 - entropy / ops.log(vocab), 0.0, 1.0)
    probs = ops.softmax(logits, axis=-1)
    if criterion == "max_prob":
        return ops.max(probs, axis=-1)
    top2, _ = ops.top_k(probs, k=2)
    return top2[..., 0] - top2[..., 1]


def exit_confidence(policy, block, normed, hidden, memory, first, cheap_head=None):
    """Confidence `(batch,)` of one decision exit in a decode step, and the criterion's
    memory for the next decision exit.

    Args:
        policy: the `ExitPolicy` (criterion, patience).
        block: the `EarlyExitBlock` of the exit.
        normed: `(batch, 1, hidden)`, the exit norm of `hidden`.
        hidden: `(batch, 1, hidden)`, the residual stream at the exit.
        memory: what a criterion compares across the decision exits of one step: the
            previous hidden state (saturation), cheap-head log-probs (kl), or top-1 and
            streak (patience). None before the first decision for kl and patience.
        first: bool, this is the step's first decision exit.
        cheap_head: the shared cheap head built once per step, or None.
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
        return logit_confidence(cheap, criterion)[:, 0], memory
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


def initial_memory(criterion: str, hidden):
    """The criterion's memory before the first decision exit of a step."""
    return ops.cast(hidden[:, 0], "float32") if criterion == "saturation" else None
