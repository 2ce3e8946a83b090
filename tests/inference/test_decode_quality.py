import json
import os
import subprocess
import sys

import numpy as np
import pytest

from toex_tf.analysis.exit_eval import exit_indices
from toex_tf.analysis.quality import compare_modes, score_decoding, summarize_scores
from toex_tf.inference import DecoderAdapter, ExitPolicy, generate
from toex_tf.inference.teacher_forced import exit_logits
from toex_tf.layers.top_k_confidence_gate import TopKConfidenceGate
from toex_tf.models import build_gpt
from toex_tf.models.gpt import with_exit_signals

STREAM = np.random.default_rng(0).integers(0, 64, size=(4, 17)).astype("int32")
INPUTS, TARGETS = STREAM[:, :-1], STREAM[:, 1:]  # windows as lm_windows cuts them


def _model(**kwargs):
    return build_gpt("tiny", **{"num_layers": 4, "exit_layers": "all", **kwargs})


def _peaky_model():
    """A random model with sharp distributions, so exit confidences spread out."""
    model = _model()
    embeddings = model.token_embedding.embeddings
    embeddings.assign(np.asarray(embeddings) * 30.0)
    return model


def _numpy(scores):
    return {k: np.asarray(v) for k, v in scores.items()}


def _forward_nll(logits, targets):
    logits = np.asarray(logits, "float64")
    peak = logits.max(-1, keepdims=True)
    log_norm = np.log(np.exp(logits - peak).sum(-1, keepdims=True)) + peak
    return np.take_along_axis(log_norm - logits, targets[..., None], axis=-1)[..., 0]


def _cheap_confidences(model, inputs, criterion):
    """Forward pass: per-exit logits and cheap-head confidences `(batch, length, exits)`."""
    outputs = with_exit_signals(model)(inputs)
    gate = TopKConfidenceGate(criterion=criterion)
    confidence = np.stack(
        [np.asarray(gate.confidence(cheap)) for cheap in outputs["cheap_logits"]], axis=-1
    )
    logits = np.stack([np.asarray(x) for x in outputs["exit_logits"]], axis=-2)
    return logits, confidence


def _mixed_threshold(confidence):
    """A threshold in a wide gap of the early exits' confidences, mixing early and full."""
    values = np.sort(confidence[..., :-1].ravel())
    gaps = np.diff(values)
    middle = slice(len(values) // 3, 2 * len(values) // 3)
    index = middle.start + int(np.argmax(gaps[middle]))
    assert gaps[index] > 1e-4  # far above float noise in the confidences (about 1e-6)
    return float((values[index] + values[index + 1]) / 2)


@pytest.mark.parametrize("prefix_length", [1, 5])
def test_full_mode_scores_equal_one_uncached_forward_pass(prefix_length):
    model = _model()
    adapter = DecoderAdapter(model)
    scores = _numpy(score_decoding(adapter, ExitPolicy("full"), INPUTS, TARGETS, prefix_length))
    logits = np.asarray(model(INPUTS)["exit_logits"][-1])[:, prefix_length - 1 :]
    targets = TARGETS[:, prefix_length - 1 :]
    reference = _forward_nll(logits, targets)
    assert scores["nll"].shape == reference.shape == (4, 17 - prefix_length)
    np.testing.assert_allclose(scores["nll"], reference, atol=1e-5)
    assert abs(scores["nll"].mean() - reference.mean()) < 1e-5
    np.testing.assert_array_equal(scores["correct"], logits.argmax(-1) == targets)
    assert (scores["exit_layer"] == 4).all() and (scores["depth"] == 4).all()
    summary = summarize_scores(scores, adapter.exit_layers)
    assert summary["perplexity"] == pytest.approx(np.exp(reference.mean()), rel=1e-5)
    assert summary["tokens"] == reference.size and summary["avg_layers"] == 4.0


@pytest.mark.parametrize("criterion", ["max_prob", "margin"])
def test_unfrozen_equals_the_first_passing_exit_of_a_forward_pass(criterion):
    model = _peaky_model()
    adapter = DecoderAdapter(model)
    logits, confidence = _cheap_confidences(model, INPUTS, criterion)
    threshold = _mixed_threshold(confidence)
    prefix = 3
    scores = _numpy(
        score_decoding(
            adapter, ExitPolicy("unfrozen", criterion, threshold), INPUTS, TARGETS, prefix
        )
    )
    # By hand: the first exit whose cheap confidence passes; the prefill position
    # (prefix - 1) is always scored at full depth.
    index = exit_indices(confidence.reshape(-1, 4), threshold).reshape(4, 16)
    index[:, prefix - 1] = 3
    chosen = np.take_along_axis(logits, index[..., None, None], axis=2)[:, :, 0]
    chosen, targets, index = (
        chosen[:, prefix - 1 :],
        TARGETS[:, prefix - 1 :],
        index[:, prefix - 1 :],
    )
    assert 0.2 < (index < 3).mean() < 0.9, "the threshold should mix early and full exits"
    np.testing.assert_array_equal(scores["exit_layer"], index + 1)
    np.testing.assert_allclose(scores["nll"], _forward_nll(chosen, targets), atol=1e-4)
    np.testing.assert_array_equal(scores["correct"], chosen.argmax(-1) == targets)
    assert (scores["depth"] == 4).all()  # unfrozen always runs every layer


def _mixed_policies(model, max_pending=3):
    _, confidence = _cheap_confidences(model, INPUTS, "max_prob")
    threshold = _mixed_threshold(confidence)
    return threshold, {
        mode: ExitPolicy(mode, "max_prob", threshold, max_pending=max_pending)
        for mode in ("unfrozen", "frozen", "lazy")
    }


def _window_by_window(adapter, policy):
    """Each window decoded alone (batch 1, where skipping is not held back by other rows)."""
    scores = [
        _numpy(score_decoding(adapter, policy, INPUTS[i : i + 1], TARGETS[i : i + 1]))
        for i in range(len(INPUTS))
    ]
    return {
        "nll": np.concatenate([s["nll"] for s in scores]),
        "correct": np.concatenate([s["correct"] for s in scores]),
        "exit_layer": np.concatenate([s["exit_layer"] for s in scores]),
        "depth": np.stack([s["depth"] for s in scores]),
    }


@pytest.mark.parametrize("max_pending", [2, 5])
def test_lazy_scores_exactly_what_unfrozen_scores_with_less_work(max_pending):
    model = _peaky_model()
    adapter = DecoderAdapter(model)
    _, policies = _mixed_policies(model, max_pending)
    unfrozen = _numpy(score_decoding(adapter, policies["unfrozen"], INPUTS, TARGETS))
    batched = _numpy(score_decoding(adapter, policies["lazy"], INPUTS, TARGETS))
    alone = _window_by_window(adapter, policies["lazy"])
    for lazy in (batched, alone):
        np.testing.assert_array_equal(lazy["exit_layer"], unfrozen["exit_layer"])
        np.testing.assert_array_equal(lazy["correct"], unfrozen["correct"])
        np.testing.assert_allclose(lazy["nll"], unfrozen["nll"], atol=1e-5)
    assert (alone["depth"] < 4).any(), "lazy mode should have deferred some layers"


def test_frozen_bounds_and_its_approximate_state():
    # Unscaled embeddings: the blocks, not the embedding, dominate the residual stream,
    # so projected K/V visibly move later predictions.
    model = _model()
    adapter = DecoderAdapter(model)
    full = _numpy(score_decoding(adapter, ExitPolicy("full"), INPUTS, TARGETS))
    never = _numpy(score_decoding(adapter, ExitPolicy("frozen", "max_prob", 1.0), INPUTS, TARGETS))
    np.testing.assert_allclose(never["nll"], full["nll"], atol=1e-6)
    assert (never["depth"] == 4).all()
    # Threshold 0: every token exits at layer 1, whose cache is always exact, so frozen
    # predicts exactly what unfrozen does while running one layer per step.
    always = {
        mode: _numpy(score_decoding(adapter, ExitPolicy(mode, "max_prob", 0.0), INPUTS, TARGETS))
        for mode in ("unfrozen", "frozen")
    }
    np.testing.assert_allclose(always["frozen"]["nll"], always["unfrozen"]["nll"], atol=1e-5)
    assert (always["frozen"]["depth"][1:] == 1).all()
    # Mixed: up to the first step that skipped, frozen equals unfrozen; afterwards a
    # token that goes deeper attends to projected K/V, and its scores move.
    _, policies = _mixed_policies(model)
    unfrozen = _numpy(score_decoding(adapter, policies["unfrozen"], INPUTS, TARGETS))
    frozen = _window_by_window(adapter, policies["frozen"])
    moved = 0
    for row in range(len(INPUTS)):
        skipped = np.flatnonzero(frozen["depth"][row] < 4)
        first = skipped[0] if len(skipped) else len(frozen["depth"][row])
        np.testing.assert_allclose(
            frozen["nll"][row, : first + 1], unfrozen["nll"][row, : first + 1], atol=1e-5
        )
        # Far above float noise (exact paths agree to about 1e-6).
        moved += np.abs(frozen["nll"][row] - unfrozen["nll"][row]).max() > 1e-4
    assert moved >= 2, "projected K/V should change later tokens' scores"


def test_compare_modes_aggregates_batches_and_compiles():
    model = _peaky_model()
    adapter = DecoderAdapter(model)
    threshold, policies = _mixed_policies(model)
    result = compare_modes(
        adapter, [policies["unfrozen"], policies["lazy"]], INPUTS, TARGETS, batch_size=2
    )
    # Full and unfrozen are row-independent: batches of 2 equal one eager batch of 4.
    pairs = ((ExitPolicy("full"), result["full"]), (policies["unfrozen"], result["rows"][0]))
    for policy, summary in pairs:
        eager = summarize_scores(
            score_decoding(adapter, policy, INPUTS, TARGETS), adapter.exit_layers
        )
        assert summary["perplexity"] == pytest.approx(eager["perplexity"], rel=1e-5)
        assert summary["accuracy"] == pytest.approx(eager["accuracy"])
        assert summary["exit_distribution"] == pytest.approx(eager["exit_distribution"])
    assert result["full"]["tokens"] == INPUTS.size
    unfrozen, lazy = result["rows"]
    assert (unfrozen["mode"], unfrozen["criterion"], unfrozen["threshold"]) == (
        "unfrozen",
        "max_prob",
        threshold,
    )
    assert unfrozen["perplexity_increase"] == pytest.approx(
        unfrozen["perplexity"] / result["full"]["perplexity"] - 1
    )
    assert unfrozen["accuracy_delta"] == pytest.approx(
        unfrozen["accuracy"] - result["full"]["accuracy"]
    )
    assert unfrozen["avg_layers"] == 4.0 and lazy["avg_layers"] < 4.0
    assert 1.0 < unfrozen["avg_exit_layer"] < 4.0
    for key in ("perplexity", "accuracy", "avg_exit_layer"):
        assert lazy[key] == pytest.approx(unfrozen[key], rel=1e-5)
    assert sum(unfrozen["exit_distribution"].values()) == pytest.approx(1.0)


def test_summaries_weight_each_batch_by_its_tokens():
    first = {
        "nll": np.array([[1.0, 2.0], [3.0, 4.0]]),
        "correct": np.array([[1.0, 0.0], [0.0, 0.0]]),
        "exit_layer": np.array([[4, 1], [4, 2]]),
        "depth": np.array([4, 2]),
    }
    second = {
        "nll": np.array([[5.0, 6.0]]),
        "correct": np.array([[1.0, 1.0]]),
        "exit_layer": np.array([[4, 4]]),
        "depth": np.array([4, 4]),
    }
    summary = summarize_scores([first, second], (1, 2, 4))
    assert summary["perplexity"] == pytest.approx(np.exp(3.5))
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["avg_layers"] == pytest.approx((6 * 2 + 8 * 1) / 6)
    assert summary["avg_exit_layer"] == pytest.approx(19 / 6)
    assert summary["exit_distribution"] == pytest.approx({"1": 1 / 6, "2": 1 / 6, "4": 4 / 6})


@pytest.mark.parametrize(
    "inputs, targets, prefix_length, error",
    [
        (INPUTS[0], TARGETS[0], 1, "rank 2"),
        (INPUTS, TARGETS[:, :-1], 1, "targets must have the shape"),
        (INPUTS, TARGETS, 0, "prefix_length"),
        (INPUTS, TARGETS, 16, "prefix_length"),
        (np.zeros((1, 40), "int32"), np.zeros((1, 40), "int32"), 1, "max_length=32"),
    ],
)
def test_bad_scoring_input(inputs, targets, prefix_length, error):
    adapter = DecoderAdapter(_model())
    with pytest.raises(ValueError, match=error):
        score_decoding(adapter, ExitPolicy("full"), inputs, targets, prefix_length)
    with pytest.raises(ValueError, match=error):
        compare_modes(adapter, [], inputs, targets, prefix_length=prefix_length, compile=False)


def test_bad_comparison_input():
    adapter = DecoderAdapter(_model())
    with pytest.raises(ValueError, match="vocab_size=64"):
        compare_modes(adapter, [], INPUTS, TARGETS + 64, compile=False)
    with pytest.raises(ValueError, match="batch_size"):
        compare_modes(adapter, [], INPUTS, TARGETS, batch_size=0, compile=False)
    with pytest.raises(TypeError, match="integer"):
        compare_modes(adapter, [], INPUTS.astype("float32"), TARGETS, compile=False)


def test_jax_backend_jits_the_same_scores(tmp_path):
    """`compare_modes` under KERAS_BACKEND=jax (jax.jit) scores what eager TF scores."""
    model = _peaky_model()
    path = tmp_path / "gpt.keras"
    model.save(path)
    adapter = DecoderAdapter(model)
    threshold, policies = _mixed_policies(model)
    expected = compare_modes(adapter, [policies["frozen"]], INPUTS, TARGETS, compile=False)
    code = (
        "import json, keras, numpy as np, toex_tf.models\n"
        "from toex_tf.inference import DecoderAdapter, ExitPolicy\n"
        "from toex_tf.analysis.quality import compare_modes\n"
        f"model = keras.saving.load_model({str(path)!r})\n"
        "adapter = DecoderAdapter(model)\n"
        f"stream = np.array({STREAM.tolist()}, 'int32')\n"
        f"policy = ExitPolicy('frozen', 'max_prob', {threshold!r}, max_pending=3)\n"
        "result = compare_modes(adapter, [policy], stream[:, :-1], stream[:, 1:])\n"
        f"json.dump(result, open({str(tmp_path / 'r.json')!r}, 'w'))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "r.json") as f:
        jax_result = json.load(f)
    for summary, reference in ((jax_result["full"], expected["full"]),) + tuple(
        zip(jax_result["rows"], expected["rows"])
    ):
        for key in ("perplexity", "accuracy", "avg_layers", "avg_exit_layer"):
            assert summary[key] == pytest.approx(reference[key], rel=1e-4), key


def test_exit_logits_full_mode_equals_the_forward_pass():
    model = _model()
    adapter = DecoderAdapter(model)
    logits, exits = exit_logits(adapter, ExitPolicy("full"), INPUTS)
    forward = np.asarray(model(INPUTS)["exit_logits"][-1])
    np.testing.assert_allclose(np.asarray(logits), forward, atol=1e-4, rtol=0)
    assert np.all(np.asarray(exits) == 4)


@pytest.mark.parametrize("mode", ["unfrozen", "frozen", "lazy"])
def test_exit_logits_on_generated_tokens_reproduce_generation(mode):
    """Teacher forcing on the tokens `generate` emitted retraces the same decode: the
    argmax of each position's logits is the next emitted token and the exits agree."""
    model = _peaky_model()
    adapter = DecoderAdapter(model)
    policy = ExitPolicy(mode, "max_prob", 0.3)  # the emitted tokens exit at layer 1
    prompt = INPUTS[:2, :4]
    tokens, exits = generate(adapter, prompt, 8, policy)
    tokens, exits = np.asarray(tokens), np.asarray(exits)
    sequence = np.concatenate([prompt, tokens], axis=1)
    logits, forced_exits = exit_logits(adapter, policy, sequence, prefix_length=4)
    logits, forced_exits = np.asarray(logits), np.asarray(forced_exits)
    # Column k is position 3 + k, which predicts emitted token k.
    np.testing.assert_array_equal(logits[:, :-1].argmax(-1), tokens)
    np.testing.assert_array_equal(forced_exits[:, :-1], exits)
    assert (exits[:, 1:] < 4).all()  # the decode steps exited early


def test_exit_logits_nll_matches_score_decoding():
    model = _peaky_model()
    adapter = DecoderAdapter(model)
    threshold = _mixed_threshold(_cheap_confidences(model, INPUTS, "max_prob")[1])
    policy = ExitPolicy("frozen", "max_prob", threshold)
    logits, exits = exit_logits(adapter, policy, INPUTS)
    scores = _numpy(score_decoding(adapter, policy, INPUTS, TARGETS))
    np.testing.assert_allclose(_forward_nll(logits, TARGETS), scores["nll"], atol=1e-4)
    np.testing.assert_array_equal(np.asarray(exits), scores["exit_layer"])


def test_exit_logits_rejects_bad_windows():
    adapter = DecoderAdapter(_model())
    with pytest.raises(ValueError, match="rank|batch, length"):
        exit_logits(adapter, ExitPolicy("full"), INPUTS[0])
    with pytest.raises(ValueError, match="max_length"):
        exit_logits(adapter, ExitPolicy("full"), np.zeros((1, 10_000), "int32"))
    with pytest.raises(ValueError, match="prefix_length"):
        exit_logits(adapter, ExitPolicy("full"), INPUTS, prefix_length=INPUTS.shape[1] + 1)
