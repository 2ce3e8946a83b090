"""Decode-time exit criteria: each decision is recomputed by hand from an uncached forward."""

import keras
import numpy as np
import pytest

from toex_tf.inference import DecoderAdapter, ExitPolicy, generate
from toex_tf.models import build_gpt

PROMPT = np.random.default_rng(0).integers(0, 64, size=(2, 3)).astype("int32")
NEW_TOKENS = 14
NUM_LAYERS = 4


def _peaky_adapter(scale=30.0, learned_gates=False):
    """A random model with sharp distributions (embeddings scaled up), so confidences
    spread out. Scaling also makes the residual stream nearly constant across layers,
    so the saturation criterion is tested on the unscaled model (`scale=1`)."""
    model = build_gpt(
        "tiny", num_layers=NUM_LAYERS, exit_layers="all", max_length=32, learned_gates=learned_gates
    )
    embeddings = model.token_embedding.embeddings
    embeddings.assign(np.asarray(embeddings) * scale)
    rng = np.random.default_rng(5)
    for block in model.blocks:  # untrained gates say 0.5 everywhere: give them opinions
        gate = getattr(block, "learned_gate", None)
        for weight in [] if gate is None else gate.weights:
            weight.assign(rng.normal(0.0, 1.0, weight.shape).astype("float32"))
    return DecoderAdapter(model)


def _depth_dependent_adapter(learned_gates=False):
    """A random model whose layers each move the residual stream (residual-branch output
    kernels redrawn with std 1/sqrt(fan_in)), without peaky embeddings: every criterion's
    confidence then varies by token and by layer, and exits disagree on the next token
    (the peaky model's exits all predict the input token)."""
    keras.utils.set_random_seed(1)
    adapter = _peaky_adapter(1.0, learned_gates)
    rng = np.random.default_rng(1)
    for block in adapter.blocks:
        for weight in block.weights:
            if weight.path.endswith(("ffn/down/kernel", "attention_output/kernel")):
                std = 1.0 / np.sqrt(weight.shape[0])
                weight.assign(rng.normal(0.0, std, weight.shape).astype("float32"))
    return adapter


def _softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _per_exit_signals(adapter, sequence):
    """Hidden states, cheap logits and embedding of every position at every layer."""
    hidden = adapter.embed(sequence, 0)
    embedded = np.asarray(hidden, "float64")
    states, cheap, learned = [], [], []
    for block in adapter.blocks:
        hidden = block.block(hidden)
        states.append(np.asarray(hidden, "float64"))
        normed = block.exit_norm(hidden)
        cheap.append(np.asarray(block.output_embedding(normed, mode="cheap_logits"), "float64"))
        if getattr(block, "learned_gate", None) is not None:
            learned.append(np.asarray(block.learned_gate(normed), "float64"))
    return embedded, states, cheap, learned


def _confidences(criterion, embedded, states, cheap, learned, patience):
    """Confidence `(exits, batch, seq)` at the non-final exits, by the module's definitions."""
    out, previous, streak, previous_top = [], embedded, None, None
    for layer in range(NUM_LAYERS - 1):
        probs = _softmax(cheap[layer])
        if criterion == "max_prob":
            out.append(probs.max(-1))
        elif criterion == "learned":
            out.append(learned[layer])
        elif criterion == "kl":
            if layer == 0:
                out.append(np.zeros(probs.shape[:-1]))
            else:
                prev = _softmax(cheap[layer - 1])
                out.append(np.exp(-np.sum(probs * (np.log(probs) - np.log(prev)), -1)))
        elif criterion == "saturation":
            h = states[layer]
            cos = (h * previous).sum(-1) / np.linalg.norm(h, axis=-1)
            cos = cos / np.linalg.norm(previous, axis=-1)
            out.append(np.clip(cos, 0, 1))
            previous = h
        elif criterion == "patience":
            top = cheap[layer].argmax(-1)
            streak = (
                np.zeros(top.shape) if layer == 0 else np.where(top == previous_top, streak + 1, 0)
            )
            previous_top = top
            out.append(np.minimum(streak / patience, 1.0))
    return np.stack(out)


def _candidate_thresholds(confidence, count=5):
    """Up to `count` thresholds at quantiles of `confidence`, each a midpoint between
    distinct values, so that no threshold ties a confidence (float32 vs 64)."""
    values = np.unique(confidence)
    gaps = np.flatnonzero(np.diff(values) > 1e-5)
    midpoints = (values[gaps] + values[gaps + 1]) / 2
    if len(midpoints) <= count:  # patience: a few discrete levels; try them all
        return midpoints
    positions = np.linspace(0.2, 0.9, count) * (len(midpoints) - 1)
    return np.unique(midpoints[positions.astype(int)])


def _expected_exits(confidence, thresholds):
    """First exit whose confidence passes, else the final layer; `(batch, seq)`."""
    passed = confidence > thresholds[None]
    first = np.argmax(passed, axis=0) + 1
    return np.where(passed.any(axis=0), first, NUM_LAYERS)


@pytest.mark.parametrize(
    "criterion, patience, decay",
    [
        ("max_prob", 2, 3.0),  # the decaying threshold
        ("kl", 2, None),
        ("saturation", 2, None),
        ("patience", 1, None),
        ("patience", 2, None),
        ("learned", 2, None),
    ],
)
def test_unfrozen_exits_follow_the_criterion(criterion, patience, decay):
    scale = 1.0 if criterion in ("saturation", "patience", "learned") else 30.0
    adapter = _peaky_adapter(scale, learned_gates=criterion == "learned")
    # Thresholds at quantiles of the confidences along the full-depth text, so that some
    # tokens pass and some do not, whatever the criterion's scale.
    reference, _ = generate(adapter, PROMPT, NEW_TOKENS)
    sequence = np.concatenate([PROMPT, np.asarray(reference)], axis=1)
    confidence = _confidences(criterion, *_per_exit_signals(adapter, sequence), patience)
    candidates = _candidate_thresholds(confidence)
    found_mixed = False
    for threshold in candidates:
        policy = ExitPolicy(
            "unfrozen", criterion, float(threshold), patience=patience, threshold_decay=decay
        )
        tokens, exits = (np.asarray(x) for x in generate(adapter, PROMPT, NEW_TOKENS, policy))
        sequence = np.concatenate([PROMPT, tokens], axis=1)
        signals = _per_exit_signals(adapter, sequence)
        confidence = _confidences(criterion, *signals, patience)
        positions = np.arange(sequence.shape[1])
        thresholds = np.asarray(policy.threshold_at(positions, adapter.max_length))
        expected = _expected_exits(confidence, np.broadcast_to(thresholds, sequence.shape))
        # Column j > 0 was decided at the step that fed position P + j - 1.
        decided_at = expected[:, PROMPT.shape[1] : PROMPT.shape[1] + NEW_TOKENS - 1]
        np.testing.assert_array_equal(exits[:, 1:], decided_at)
        found_mixed |= len(np.unique(exits[:, 1:])) >= 2  # decisions differ by token
    assert found_mixed, "every token took the same exit at every threshold: the test proves little"


@pytest.mark.parametrize("criterion", ["kl", "saturation", "patience", "learned"])
def test_lazy_is_exact_with_every_criterion(criterion):
    adapter = _depth_dependent_adapter(learned_gates=criterion == "learned")
    reference, _ = generate(adapter, PROMPT, NEW_TOKENS)
    sequence = np.concatenate([PROMPT, np.asarray(reference)], axis=1)
    confidence = _confidences(criterion, *_per_exit_signals(adapter, sequence), patience=2)
    exercised = 0
    for threshold in _candidate_thresholds(confidence):
        reference = generate(
            adapter, PROMPT, NEW_TOKENS, ExitPolicy("unfrozen", criterion, float(threshold))
        )
        policy = ExitPolicy("lazy", criterion, float(threshold), max_pending=3)
        tokens, exits, state = generate(adapter, PROMPT, NEW_TOKENS, policy, return_state=True)
        for a, b in zip(reference, (tokens, exits)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # Exits vary by token (not all at one layer, not none) and layers were deferred.
        varied = len(np.unique(np.asarray(exits)[:, 1:])) >= 2
        deferred = int(state["layers_run"]) < NUM_LAYERS * int(state["steps"])
        exercised += varied and deferred
    assert exercised, "no threshold made lazy mode defer layers with varied exits"


@pytest.mark.parametrize("criterion", ["kl", "saturation", "patience"])
@pytest.mark.parametrize("mode", ["unfrozen", "frozen", "lazy"])
def test_never_exit_generates_full_depth_tokens(criterion, mode):
    adapter = _peaky_adapter()
    reference, _ = generate(adapter, PROMPT, 8, ExitPolicy("full"))
    tokens, exits = generate(
        adapter, PROMPT, 8, ExitPolicy(mode, criterion, 1.0, threshold_decay=1.0)
    )
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(reference))
    assert (np.asarray(exits) == NUM_LAYERS).all()


def test_decaying_threshold_follows_calm():
    policy = ExitPolicy("frozen", "max_prob", 0.5, threshold_decay=4.0)
    values = np.asarray(policy.threshold_at(np.array([0, 16, 32]), 32))
    expected = 0.9 * 0.5 + 0.1 * np.exp(-4.0 * np.array([0, 0.5, 1.0]))
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert ExitPolicy("frozen", "max_prob", 1.0, threshold_decay=4.0).threshold_at(5, 32) == 1.0
    assert ExitPolicy("frozen", "max_prob", 0.3).threshold_at(5, 32) == 0.3


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(criterion="kl_div"), "criterion"),
        (dict(patience=0), "patience"),
        (dict(patience=1.5), "patience"),
        (dict(threshold_decay=-1.0), "threshold_decay"),
        (dict(threshold_decay="fast"), "threshold_decay"),
    ],
)
def test_bad_criterion_settings(kwargs, error):
    with pytest.raises(ValueError, match=error):
        ExitPolicy("frozen", **kwargs)


def test_learned_criterion_without_gates_is_a_clear_error():
    adapter = _peaky_adapter()
    with pytest.raises(ValueError, match="LearnedExitGate"):
        generate(adapter, PROMPT, 4, ExitPolicy("frozen", "learned", 0.5))
