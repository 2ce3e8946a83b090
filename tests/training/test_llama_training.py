"""Two-phase training of `HierarchicalLlama` on a frozen base."""

import numpy as np
import pytest

from toex_tf.analysis.quality import score_decoding
from toex_tf.calibration.routers import exit_depth_threshold
from toex_tf.inference import DecoderAdapter, ExitPolicy
from toex_tf.models import build_llama
from toex_tf.training.llama_training import LlamaPhaseTrainer, capacity_schedule, train_phase


def _data(n=32, seq=16, vocab=256, seed=0):
    # A learnable pattern: each id is the previous plus one (mod 64), from a random start.
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, 64, (n, 1))
    stream = (starts + np.arange(seq + 1)[None, :]) % 64
    return stream[:, :-1].astype("int32"), stream[:, 1:].astype("int32")


def _base_weights(model):
    return {
        w.path: np.asarray(w).copy()
        for w in model.weights
        if "router" not in w.path and "learned_gate" not in w.path and "exit_norm" not in w.path
    }


def _model(**overrides):
    return build_llama("llama-tiny", **{"num_layers": 4, "exit_layers": (2,), **overrides})


def test_base_phase_learns_a_pattern():
    model = _model(exit_layers=(), capacity=1.0)
    inputs, targets = _data()
    logs = train_phase(model, inputs, targets, "base", steps=60, learning_rate=3e-3)
    assert logs["lm"] < 3.0  # from ln(256) = 5.5
    assert not model.trainable_weights  # back to frozen


def test_router_phase_trains_routers_only_with_a_capacity_schedule():
    model = _model()
    before = _base_weights(model)
    router_before = np.asarray(model.routers[0].router_dense.kernel).copy()
    inputs, targets = _data()
    logs = train_phase(model, inputs, targets, "routers", steps=16, capacity_start=0.9)
    assert logs["schedule"][0][0] == pytest.approx(0.9) and logs["schedule"][-1][0] == 0.55
    assert all(router.capacity == 0.55 for router in model.routers)
    for path, value in before.items():
        np.testing.assert_array_equal(_base_weights(model)[path], value, err_msg=path)
    assert np.abs(np.asarray(model.routers[0].router_dense.kernel) - router_before).max() > 0
    assert logs["router"] > 0 and np.isfinite(logs["distill"])


def test_exit_phase_compute_penalty_moves_exits_earlier():
    inputs, targets = _data()
    depths = {}
    for weight in (0.0, 20.0):
        model = _model(capacity=1.0)
        before = _base_weights(model)
        logs = train_phase(
            model, inputs, targets, "exits", steps=30, learning_rate=1e-2, compute_weight=weight
        )
        for path, value in before.items():
            np.testing.assert_array_equal(_base_weights(model)[path], value)
        depths[weight] = logs["avg_exit_layer"]
    assert depths[20.0] < depths[0.0]
    assert depths[20.0] < 3.0


def test_exit_depth_threshold_hits_a_target_depth():
    model = _model(capacity=1.0, exit_layers=(1, 2, 3))
    rng = np.random.default_rng(0)
    for gate in model.gates:
        gate.kernel.assign(rng.normal(0, 1, gate.kernel.shape).astype("float32"))
    inputs, _ = _data()
    adapter = DecoderAdapter(model)
    for target in (1.8, 2.5, 3.2):
        threshold = exit_depth_threshold(model, inputs, target)
        assert 0 < threshold < 1
        # Measured by the decode engine, teacher-forced on the same tokens: the first gate
        # above the threshold. Position 0 is the prefill's (full depth) and is left out.
        policy = ExitPolicy("unfrozen", "learned", threshold)
        exits = np.asarray(score_decoding(adapter, policy, inputs, inputs)["exit_layer"])[:, 1:]
        assert abs(exits.mean() - target) < 0.15, (target, threshold, exits.mean())


def test_bad_training_input():
    model = _model()
    inputs, targets = _data()
    with pytest.raises(ValueError, match="phase must be one of"):
        train_phase(model, inputs, targets, "everything", steps=1)
    with pytest.raises(ValueError, match="equal non-empty"):
        train_phase(model, inputs, targets[:, :3], "routers", steps=1)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        train_phase(model, inputs + 1000, targets, "routers", steps=1)
    with pytest.raises(ValueError, match="needs routers"):
        LlamaPhaseTrainer(_model(capacity=1.0), "routers")
    with pytest.raises(ValueError, match="needs exit gates"):
        LlamaPhaseTrainer(_model(exit_layers=()), "exits")
    with pytest.raises(ValueError, match="capacity start"):
        capacity_schedule(1.5, 0.5, 10)
