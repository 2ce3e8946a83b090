"""Exit heads on a frozen base from cached states (`toex_tf.training.exit_heads`)."""

import numpy as np
import pytest

from toex_tf.models.llama import build_llama
from toex_tf.training.exit_heads import (
    ExitStates,
    cache_exit_states,
    evaluate_exit_heads,
    fit_gates_on_states,
    train_exit_heads,
)

RNG = np.random.default_rng(0)
INPUTS = RNG.integers(0, 256, (6, 16)).astype("int32")
TARGETS = np.roll(INPUTS, -1, axis=1)


def _model(**overrides):
    settings = dict(
        num_layers=3, exit_layers=(1, 2), capacity=1.0, exit_adapter="mlp", exit_adapter_units=16
    )
    return build_llama("llama-tiny", **{**settings, **overrides})


def test_cache_holds_each_exit_and_the_final_state():
    model = _model()
    states = cache_exit_states(model, INPUTS, TARGETS, batch_size=4)
    assert sorted(states.hidden) == [1, 2] and states.num_tokens == INPUTS.size
    assert states.hidden[1].shape == (INPUTS.size, 64) == states.final.shape
    # The final normed state gives the model's own logits.
    logits = np.asarray(model.blocks[-1].output_embedding(states.final, mode="logits"))
    expected = np.asarray(model(INPUTS)["logits"]).reshape(logits.shape)
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_an_exit_fed_the_final_state_matches_full_depth():
    model = _model()
    states = cache_exit_states(model, INPUTS, TARGETS)
    # The final block's output before its norm, given as exit 2's input: with an identity
    # adapter and the same norm scale, exit 2 is the full-depth head.
    hidden = model.embed_tokens(INPUTS)
    for block in model.blocks:
        hidden = block.block(hidden)
    final_hidden = np.asarray(hidden).reshape(-1, 64)
    same = ExitStates({2: final_hidden}, states.final, states.targets)
    report = evaluate_exit_heads(model, same)
    assert report[2]["kl_to_final"] == pytest.approx(0.0, abs=1e-5)
    assert report[2]["top1_agreement"] == 1.0
    assert report[2]["perplexity_increase"] == pytest.approx(0.0, abs=1e-4)


def test_distillation_moves_the_exit_towards_the_final_layer():
    model = _model()
    states = cache_exit_states(model, INPUTS, TARGETS)
    before = evaluate_exit_heads(model, states)
    base = [w.numpy().copy() for w in model.token_embedding.weights]
    train_exit_heads(model, states, steps=60, batch_size=32, learning_rate=1e-2, lm_weight=0.0)
    after = evaluate_exit_heads(model, states)
    for layer in (1, 2):
        assert after[layer]["kl_to_final"] < 0.5 * before[layer]["kl_to_final"]
    # The shared head did not train, and full depth is unchanged.
    for weight, value in zip(model.token_embedding.weights, base):
        np.testing.assert_array_equal(weight.numpy(), value)
    assert after["full"]["perplexity"] == pytest.approx(before["full"]["perplexity"])
    gates = fit_gates_on_states(model, states, states, epochs=1)
    assert set(gates["validation"]) == {1, 2}


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="inputs and targets must both be"):
        cache_exit_states(model, INPUTS, TARGETS[:, :3])
    with pytest.raises(ValueError, match="no exit below its last layer"):
        cache_exit_states(_model(exit_layers=()), INPUTS, TARGETS)
    states = cache_exit_states(model, INPUTS, TARGETS)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        train_exit_heads(model, states, steps=0)
