import numpy as np
import pytest

from toex_tf.models import build_gpt
from toex_tf.training.exit_loss import EarlyExitTrainer, exit_loss_weights


def test_weight_schedules_rise_with_depth_and_sum_to_one():
    linear = exit_loss_weights("linear", (1, 2, 4), 4)
    np.testing.assert_allclose(linear, np.array([1, 2, 4]) / 7, rtol=1e-6)
    quadratic = exit_loss_weights("quadratic", (1, 2, 4), 4)
    np.testing.assert_allclose(quadratic, np.array([1, 4, 16]) / 21, rtol=1e-6)
    np.testing.assert_allclose(exit_loss_weights("uniform", (2, 4), 4), [0.5, 0.5])
    np.testing.assert_allclose(exit_loss_weights("1,3", (2, 4), 4), [0.25, 0.75])


@pytest.mark.parametrize(
    "spec, error", [("steep", "exit_loss_weights"), ("1,2,3", "3 weights"), ("-1,2", ">= 0")]
)
def test_bad_weight_specs(spec, error):
    with pytest.raises(ValueError, match=error):
        exit_loss_weights(spec, (2, 4), 4)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_joint_loss_matches_manual_weighted_cross_entropy_and_distillation():
    model = build_gpt("tiny", num_layers=3, exit_layers="1,2")
    weights = exit_loss_weights("linear", model.exit_layers, 3)
    trainer = EarlyExitTrainer(model, weights, distill_weight=0.5, distill_temperature=2.0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 64, size=(2, 8)).astype("int32")
    y = rng.integers(0, 64, size=(2, 8)).astype("int32")
    y_pred = model(x)
    loss = float(trainer.compute_loss(x, y, y_pred))

    logits = [np.asarray(v, dtype="float64") for v in y_pred["exit_logits"]]
    expected = 0.0
    for w, exit_logits in zip(weights, logits):
        log_probs = _log_softmax(exit_logits)
        expected += w * -np.take_along_axis(log_probs, y[..., None], -1).mean()
    teacher = _log_softmax(logits[-1] / 2.0)
    kl = [(np.exp(teacher) * (teacher - _log_softmax(s / 2.0))).sum(-1).mean() for s in logits[:-1]]
    expected += 0.5 * 4.0 * np.mean(kl)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_trainer_rejects_bad_settings():
    model = build_gpt("tiny")
    with pytest.raises(ValueError, match="exit weights"):
        EarlyExitTrainer(model, [1.0])
    with pytest.raises(ValueError, match="distill"):
        EarlyExitTrainer(model, [0.5, 0.5], distill_weight=-1.0)
