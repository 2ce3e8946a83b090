"""Router predictors fitted on a frozen base (`fit_router_predictors`) and the global
allocation of a capacity over the layers (`calibrate_routers(allocation="global")`)."""

import keras
import numpy as np
import pytest

from toex_tf.calibration.routers import calibrate_routers, routed_fraction
from toex_tf.models import build_llama
from toex_tf.training.router_predictors import fit_router_predictors, relative_ffn_change

TOKENS = np.random.default_rng(0).integers(0, 256, size=(32, 16)).astype("int32")


def _model(capacity=0.5):
    keras.utils.set_random_seed(0)  # the same random base every time
    return build_llama("llama-tiny", num_layers=3, exit_layers=(), capacity=capacity)


def _predictor_weights(model):
    return {
        w.path for w in model.weights if "predictor_hidden" in w.path or "/predictor/" in w.path
    }


def test_relative_change_is_the_log_norm_ratio():
    stream = np.array([[3.0, 4.0], [1.0, 0.0]])
    delta = np.array([[0.5, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(relative_ffn_change(stream, delta), np.log([0.1, 2.0]))


def test_fit_learns_the_change_and_leaves_the_base_alone():
    model = _model()
    before = {w.path: np.asarray(w).copy() for w in model.weights}
    fitted = _predictor_weights(model)
    untrained = fit_router_predictors(_model(), TOKENS, epochs=1, fit_batch_size=32)
    reports = fit_router_predictors(model, TOKENS, epochs=30, fit_batch_size=32)
    assert [r["layer"] for r in reports] == [1, 2, 3]
    for report, early in zip(reports, untrained, strict=True):
        assert report["target_std"] > 0
        # On held-out windows the fitted prediction follows the real change.
        assert report["held_out_correlation"] > 0.25, report
        assert report["held_out_correlation"] > early["held_out_correlation"] + 0.1
    changed = {w.path for w in model.weights if not np.array_equal(before[w.path], w)}
    assert changed and changed <= fitted
    assert not model.trainable_weights  # the flags are restored


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="no routers"):
        fit_router_predictors(_model(capacity=1.0), TOKENS)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        fit_router_predictors(_model(), TOKENS + 256)
    with pytest.raises(ValueError, match="at least 2 windows"):
        fit_router_predictors(_model(), TOKENS[:1])
    with pytest.raises(TypeError, match="integer ids"):
        fit_router_predictors(_model(), TOKENS.astype("float32"))
    with pytest.raises(ValueError, match="held_out_share"):
        fit_router_predictors(_model(), TOKENS, held_out_share=1.5)


def test_global_allocation_shares_one_threshold():
    model = _model()
    fit_router_predictors(model, TOKENS, epochs=2)
    thresholds = calibrate_routers(model, TOKENS, 0.5, allocation="global")
    assert len(set(thresholds)) == 1
    assigned = [float(r.predictor_threshold) for r in model.routers]
    assert len(set(assigned)) == 1 and assigned[0] == pytest.approx(thresholds[0], rel=1e-6)
    assert routed_fraction(model, TOKENS) == pytest.approx(0.5, abs=0.1)
    # Per-layer allocation gives each layer its own threshold.
    per_layer = calibrate_routers(model, TOKENS, 0.5, allocation="layer")
    assert len(set(per_layer)) == len(per_layer)


def test_global_allocation_rejects_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="allocation must be one of"):
        calibrate_routers(model, TOKENS, 0.5, allocation="uniform")
    with pytest.raises(ValueError, match="global allocation needs a capacity"):
        calibrate_routers(model, TOKENS, None, allocation="global")
