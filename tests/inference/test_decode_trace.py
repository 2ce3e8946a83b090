"""The decode loop's trace (`generate(..., trace=k)`): what the HTML report shows.

The trace must not change what is generated, and it must say why each token left where
it did: the confidence at its exit passes the threshold, the earlier ones do not.
"""

import keras
import numpy as np
import pytest

from tests.depth_dependent import make_depth_dependent
from toex_tf.inference import DecoderAdapter, ExitPolicy, generate
from toex_tf.inference.criteria import passes
from toex_tf.models import build_gpt

NEW_TOKENS = 12
TOP = 3


@pytest.fixture(scope="module")
def adapter():
    keras.utils.set_random_seed(3)
    model = build_gpt("tiny", num_layers=4, exit_layers="all", max_length=32)
    return DecoderAdapter(make_depth_dependent(model, embedding_scale=8.0))


PROMPT = np.array([[5, 9, 3]], "int32")


@pytest.mark.parametrize(
    ("mode", "criterion", "threshold"),
    [
        ("unfrozen", "max_prob", 0.17),
        ("frozen", "max_prob", 0.17),
        ("lazy", "kl", 0.94),
    ],
)
def test_trace_explains_each_exit_and_changes_nothing(adapter, mode, criterion, threshold):
    policy = ExitPolicy(mode, criterion, threshold)
    plain_ids, plain_exits = generate(adapter, PROMPT, NEW_TOKENS, policy)
    ids, exits, trace = generate(adapter, PROMPT, NEW_TOKENS, policy, trace=TOP)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(plain_ids))
    np.testing.assert_array_equal(np.asarray(exits), np.asarray(plain_exits))
    ids, exits = np.asarray(ids)[0], np.asarray(exits)[0]
    confidences = np.asarray(trace["confidences"])[0]
    top_ids, top_probs = np.asarray(trace["top_ids"])[0], np.asarray(trace["top_probs"])[0]
    decisions = adapter.decision_layers(policy)[:-1]
    assert confidences.shape == (NEW_TOKENS, len(decisions))
    assert top_ids.shape == top_probs.shape == (NEW_TOKENS, TOP)
    # Greedy: the token is the top alternative at its exit, and probabilities are sorted.
    np.testing.assert_array_equal(top_ids[:, 0], ids)
    assert np.all(np.diff(top_probs, axis=-1) <= 1e-7) and np.all(top_probs[:, 0] > 0)
    assert np.isnan(confidences[0]).all()  # the prompt's full-depth pass decides nothing
    early = 0
    for column in range(1, NEW_TOKENS):
        row = confidences[column]
        exit_layer = int(exits[column])
        if exit_layer < adapter.num_layers:
            early += 1
            index = decisions.index(exit_layer)
            assert passes(row[index], threshold), (column, row, exit_layer)
            before = row[:index]
        else:
            before = row
        assert not np.any(passes(before[~np.isnan(before)], threshold)), (column, row)
        assert not np.isnan(before).any(), "every decision before the exit was computed"
        if mode == "frozen" and exit_layer < adapter.num_layers:
            # Batch 1: a segment after the exit is skipped, so it has no confidence.
            assert np.isnan(row[decisions.index(exit_layer) + 1 :]).all(), row
        if mode == "unfrozen":
            assert not np.isnan(row).any(), "unfrozen computes every decision"
    assert 0 < early < NEW_TOKENS - 1, f"the test needs exits and non-exits; got {exits}"
    if criterion == "kl":  # the first decision exit has nothing to compare with
        assert np.all(confidences[1:, 0] == 0.0)


def test_full_mode_trace_has_no_decisions(adapter):
    ids, _, trace = generate(adapter, PROMPT, 6, ExitPolicy("full"), trace=2)
    assert np.asarray(trace["confidences"]).shape == (1, 6, 0)
    np.testing.assert_array_equal(np.asarray(trace["top_ids"])[0, :, 0], np.asarray(ids)[0])
