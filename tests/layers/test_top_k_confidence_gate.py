import keras
import numpy as np
import pytest
from roundtrip import assert_roundtrip

from toex_tf.layers import TopKConfidenceGate


def _probs(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


LOGITS = np.array([[[4.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [2.0, 2.0, -3.0, 0.5]]], "float32")


def test_criteria_match_numpy_reference():
    p = _probs(LOGITS.astype("float64"))
    top = np.sort(p, -1)[..., ::-1]
    expected = {
        "max_prob": top[..., 0],
        "margin": top[..., 0] - top[..., 1],
        "entropy": 1 + (p * np.log(p)).sum(-1) / np.log(4),
    }
    for criterion, reference in expected.items():
        confidence, _ = TopKConfidenceGate(criterion=criterion)(LOGITS)
        np.testing.assert_allclose(np.asarray(confidence), reference, atol=1e-6)


def test_uniform_scores_zero_for_margin_and_entropy():
    for criterion in ("margin", "entropy"):
        confidence, _ = TopKConfidenceGate(criterion=criterion)(LOGITS)
        assert abs(float(np.asarray(confidence)[0, 1])) < 1e-6


def test_decision_is_strict_threshold_plus_margin():
    gate = TopKConfidenceGate(criterion="max_prob", threshold=0.5, confidence_margin=0.2)
    confidence, decision = gate(LOGITS)
    confidence, decision = np.asarray(confidence), np.asarray(decision)
    np.testing.assert_array_equal(decision, confidence > 0.7)
    assert decision.any() and not decision.all()


def test_threshold_one_never_exits_even_when_saturated():
    saturated = np.array([[1000.0, -1000.0, -1000.0]], "float32")
    for criterion in ("max_prob", "margin", "entropy"):
        confidence, decision = TopKConfidenceGate(criterion=criterion, threshold=1.0)(saturated)
        assert float(np.asarray(confidence)[0]) == pytest.approx(1.0)
        assert not np.asarray(decision).any()


def test_threshold_override_at_call():
    gate = TopKConfidenceGate(criterion="max_prob", threshold=0.99)
    _, strict = gate(LOGITS)
    _, loose = gate(LOGITS, threshold=0.0)
    assert not np.asarray(strict).any()
    assert np.asarray(loose).all()


def test_float32_signal_under_bfloat16():
    gate = TopKConfidenceGate(dtype="mixed_bfloat16")
    confidence, _ = gate(keras.ops.cast(LOGITS, "bfloat16"))
    assert keras.backend.standardize_dtype(confidence.dtype) == "float32"


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(criterion="kl"), "criterion"),
        (dict(threshold=1.5), "threshold"),
        (dict(threshold=-0.1), "threshold"),
        (dict(confidence_margin=2.0), "confidence_margin"),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        TopKConfidenceGate(**kwargs)


def test_bad_threshold_at_call():
    with pytest.raises(ValueError, match="threshold"):
        TopKConfidenceGate()(LOGITS, threshold=3.0)


def test_roundtrip(tmp_path):
    gate = TopKConfidenceGate(criterion="entropy", threshold=0.3, confidence_margin=0.05)
    loaded = assert_roundtrip(gate, LOGITS, tmp_path)
    assert loaded.layers[-1].get_config()["criterion"] == "entropy"
