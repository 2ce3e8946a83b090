import itertools

import numpy as np
import pytest

from toex_tf.layers import LearnedExitGate
from toex_tf.models import add_learned_gates, build_gpt
from toex_tf.training.gate_training import (
    binary_auc,
    exit_features_and_labels,
    fit_gate,
    fit_learned_gates,
    gate_metrics,
)

RNG = np.random.default_rng(0)
WINDOWS = RNG.integers(0, 64, size=(64, 16)).astype("int32")
HELD_OUT = RNG.integers(0, 64, size=(32, 16)).astype("int32")


def _pairwise_auc(scores, labels):
    pairs = list(itertools.product(scores[labels], scores[~labels]))
    return np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs])


def test_binary_auc_is_the_pairwise_rank_statistic():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, size=60).astype("float32")  # many ties
    labels = rng.random(60) < 0.4
    assert binary_auc(scores, labels) == pytest.approx(_pairwise_auc(scores, labels))
    assert binary_auc([0.1, 0.2, 0.9], [False, False, True]) == 1.0
    assert binary_auc([0.9, 0.2, 0.1], [False, False, True]) == 0.0
    assert binary_auc(np.zeros(4), [True, False, True, False]) == 0.5
    assert np.isnan(binary_auc([0.3, 0.4], [True, True]))


def _gated_model():
    """4 layers, an exit at each, linear-probe gates, and a learnable consistency signal.

    Tokens below 32 get embeddings 30 * (own + shared direction): the residual stream is
    the token, so every exit predicts the same top-1 (consistent), and the shared
    direction makes the class linearly separable. The rest get x0.1: the random layers
    decide, and exits disagree with the final one about half the time. A linear probe on
    the normed hidden state can learn this; nothing in the labels beyond it.
    """
    model = build_gpt("tiny", num_layers=4, exit_layers="all", max_length=16)
    embeddings = np.asarray(model.token_embedding.embeddings)
    shared = np.random.default_rng(1).normal(scale=0.02, size=16).astype("float32")
    easy = np.arange(64) < 32
    embeddings = np.where(easy[:, None], 30.0 * (embeddings + shared), 0.1 * embeddings)
    model.token_embedding.embeddings.assign(embeddings)
    return add_learned_gates(model)


def test_fitted_gates_predict_consistency_and_leave_the_model_unchanged():
    model = _gated_model()
    gates = [block.learned_gate for block in model.blocks[:-1]]
    gate_ids = {id(w) for gate in gates for w in gate.weights}
    base_before = [np.array(w) for w in model.weights if id(w) not in gate_ids]
    gates_before = [np.array(w) for gate in gates for w in gate.weights]

    report = fit_learned_gates(model, WINDOWS, epochs=20, batch_size=8, validation_inputs=HELD_OUT)

    base_after = [np.array(w) for w in model.weights if id(w) not in gate_ids]
    assert len(base_after) == len(base_before) > 0
    for before, after in zip(base_before, base_after):
        np.testing.assert_array_equal(before, after)
    gates_after = [np.array(w) for gate in gates for w in gate.weights]
    assert all(np.abs(a - b).max() > 1e-3 for a, b in zip(gates_before, gates_after))

    assert report["exit_layers"] == [1, 2, 3]
    for layer in (1, 2, 3):
        train, held_out = report["train"][layer], report["validation"][layer]
        assert train["tokens"] == WINDOWS.size and held_out["tokens"] == HELD_OUT.size
        assert 0.55 < train["positive_rate"] < 0.95  # both classes present
        assert train["auc"] > 0.75 and held_out["auc"] > 0.75
        assert report["loss"][layer][-1] < report["loss"][layer][0]

    # The control: the same gates fitted to shuffled labels find nothing to learn, so the
    # AUC above is not the capacity to memorise the training tokens.
    data = exit_features_and_labels(model, WINDOWS, batch_size=8)
    shuffled_aucs = []
    for layer, (features, labels) in data.items():
        shuffled = np.random.default_rng(layer).permutation(labels)
        gate = LearnedExitGate()
        gate.build(features.shape)
        assert gate_metrics(gate, features, shuffled)["auc"] == 0.5  # untrained: all ties
        fit_gate(gate, features, shuffled, epochs=20, batch_size=128)
        shuffled_aucs.append(gate_metrics(gate, features, shuffled)["auc"])
    real_aucs = [report["train"][layer]["auc"] for layer in (1, 2, 3)]
    assert max(shuffled_aucs) < 0.65
    assert np.mean(real_aucs) > np.mean(shuffled_aucs) + 0.2


def test_features_are_the_exit_norm_and_labels_the_top1_agreement():
    model = _gated_model()
    data = exit_features_and_labels(model, WINDOWS[:4], batch_size=3)
    exit_logits = [np.asarray(x) for x in model(WINDOWS[:4])["exit_logits"]]
    final = exit_logits[-1].argmax(-1).reshape(-1)
    for layer, (features, labels) in data.items():
        assert features.shape == (64, 16) and features.dtype == np.float32
        np.testing.assert_array_equal(
            labels, exit_logits[layer - 1].argmax(-1).reshape(-1) == final
        )
        # LayerNorm output: zero mean per token (the exit norm, not the raw residual).
        np.testing.assert_allclose(features.mean(-1), 0.0, atol=1e-4)


def test_balanced_pos_weight_and_a_frozen_gate():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(2048, 8)).astype("float32")
    labels = features[:, 0] + 0.5 * rng.normal(size=2048) > 1.0  # about 20% positive
    predicted = {}
    for pos_weight in (1.0, "balanced"):
        gate = LearnedExitGate()
        gate.build(features.shape)
        gate.trainable = False  # as inside a frozen model: fitting still trains it
        losses = fit_gate(gate, features, labels, epochs=5, batch_size=256, pos_weight=pos_weight)
        assert not gate.trainable and losses[-1] < losses[0]
        metrics = gate_metrics(gate, features, labels)
        assert metrics["auc"] > 0.9
        predicted[pos_weight] = (np.asarray(gate(features)) > 0.5).mean()
    # Up-weighting the rare positives moves the 0.5 boundary toward them.
    assert predicted["balanced"] > predicted[1.0] + 0.05
    with pytest.raises(ValueError, match="pos_weight"):
        fit_gate(gate, features, labels, pos_weight=0.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="no learned gates"):
        fit_learned_gates(build_gpt("tiny"), WINDOWS)
    with pytest.raises(ValueError, match="2-D int array"):
        exit_features_and_labels(_gated_model(), WINDOWS[0])
    with pytest.raises(ValueError, match="2-D int array"):
        exit_features_and_labels(_gated_model(), WINDOWS.astype("float32"))
