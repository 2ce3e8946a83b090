import numpy as np
import pytest

from toex_tf.analysis.cost import CostModel
from toex_tf.analysis.exit_eval import collect_exit_statistics, exit_indices, sweep
from toex_tf.layers import TopKConfidenceGate
from toex_tf.models import build_gpt

COST = CostModel(layer_macs=100.0, full_head_macs=50.0, check_macs=5.0, num_layers=4)


def test_exit_costs_count_checks_and_one_full_head():
    np.testing.assert_allclose(COST.exit_costs((1, 2, 4)), [155.0, 260.0, 460.0])
    assert COST.full_depth_macs == 450.0


def test_first_passing_exit_with_strict_threshold():
    confidence = np.array([[0.9, 0.1, 0.0], [0.2, 0.5, 0.0], [0.5, 0.5, 0.99]])
    np.testing.assert_array_equal(exit_indices(confidence, 0.5), [0, 2, 2])
    np.testing.assert_array_equal(exit_indices(confidence, 0.4), [0, 1, 0])


def test_sweep_rows_by_hand():
    stats = {
        "log_prob": np.log(np.array([[0.5, 0.8], [0.1, 0.4], [0.2, 0.2], [0.3, 0.6]])),
        "correct": np.array([[True, True], [False, True], [False, False], [False, True]]),
        "confidence": {"margin": np.array([[0.9, 0], [0.2, 0], [0.7, 0], [0.1, 0]])},
    }
    cost = CostModel(layer_macs=100.0, full_head_macs=50.0, check_macs=5.0, num_layers=4)
    result = sweep(stats, (2, 4), cost, thresholds=[0.5, 1.0])
    baseline_log_probs = np.log([0.8, 0.4, 0.2, 0.6])
    assert result["baseline"]["perplexity"] == pytest.approx(np.exp(-baseline_log_probs.mean()))
    assert result["baseline"]["accuracy"] == 0.75 and result["baseline"]["num_layers"] == 4
    row, never = result["sweeps"]
    # Tokens 0 and 2 exit at layer 2; tokens 1 and 3 go to layer 4.
    assert row["avg_exit_layer"] == 3.0 and row["exit_rate"] == 0.5
    assert row["exit_distribution"] == {"2": 0.5, "4": 0.5}
    assert row["accuracy"] == 0.75  # tokens 0, 1 and 3 are right at their exits
    assert row["perplexity"] == pytest.approx(np.exp(-np.log([0.5, 0.4, 0.2, 0.6]).mean()))
    mean_cost = np.mean([255.0, 455.0, 255.0, 455.0])
    assert row["savings"] == pytest.approx(1 - mean_cost / 450.0)
    assert row["ideal_speedup"] == pytest.approx(450.0 / mean_cost)
    # Threshold 1.0 never exits: exactly the baseline, and the checks make it cost more.
    assert never["exit_rate"] == 0.0 and never["perplexity"] == result["baseline"]["perplexity"]
    assert never["savings"] < 0


def test_collected_statistics_match_the_model_and_the_gate():
    model = build_gpt("tiny", num_layers=3, exit_layers="1,2")
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, 64, size=(5, 12)).astype("int32")
    targets = rng.integers(0, 64, size=(5, 12)).astype("int32")
    stats = collect_exit_statistics(model, inputs, targets, batch_size=2, criteria=("margin",))
    assert stats["log_prob"].shape == (60, 3) and stats["confidence"]["margin"].shape == (60, 3)
    logits = [np.asarray(v, "float64") for v in model(inputs)["exit_logits"]]
    log_probs = logits[1] - np.log(np.exp(logits[1]).sum(-1, keepdims=True))
    expected = np.take_along_axis(log_probs, targets[..., None], -1).reshape(-1)
    np.testing.assert_allclose(stats["log_prob"][:, 1], expected, atol=1e-4)
    ids = np.asarray(model.token_embedding.shortlist_ids)
    confidence, _ = TopKConfidenceGate("margin")(logits[0][..., ids].astype("float32"))
    np.testing.assert_allclose(
        stats["confidence"]["margin"][:, 0], np.asarray(confidence).reshape(-1), atol=1e-5
    )


def test_bad_evaluation_inputs():
    model = build_gpt("tiny")
    ok = np.zeros((2, 8), "int32")
    with pytest.raises(ValueError, match="vocab_size"):
        collect_exit_statistics(model, ok + 64, ok)
    with pytest.raises(ValueError, match="criterion"):
        collect_exit_statistics(model, ok, ok, criteria=("vibes",))
    with pytest.raises(ValueError, match="confidence_source"):
        collect_exit_statistics(model, ok, ok, confidence_source="oracle")
    with pytest.raises(ValueError, match="threshold"):
        sweep(
            {
                "log_prob": np.zeros((1, 2)),
                "correct": np.zeros((1, 2), bool),
                "confidence": {"margin": np.zeros((1, 2))},
            },
            (1, 2),
            COST,
            [1.5],
        )


def test_gpt_cost_model_counts_the_check_head_it_uses():
    model = build_gpt("tiny", vocab_size=64, hidden_dim=16, num_layers=2, shortlist_size=16)
    cheap = CostModel.for_gpt(model, context_length=8.0)
    full = CostModel.for_gpt(model, context_length=8.0, confidence_source="full")
    d, ffn = 16, 64
    assert cheap.layer_macs == 4 * d * d + 2 * 8.0 * d + 2 * d * ffn + 2 * d
    assert cheap.full_head_macs == 64 * d + d
    assert cheap.check_macs == 16 * d + d + 3 * 16
    assert full.check_macs == 64 * d + d + 3 * 64
