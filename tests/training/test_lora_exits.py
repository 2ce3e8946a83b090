"""LoRA tuning for early exit (`train_lora_exits`) and the model's LoRA interface."""

import keras
import numpy as np
import pytest

from toex_tf.models import build_llama
from toex_tf.training.exit_heads import cache_exit_states, evaluate_exit_heads
from toex_tf.training.lora_exits import dropout_rates, train_lora_exits

RNG = np.random.default_rng(0)
INPUTS = RNG.integers(0, 256, size=(8, 16)).astype("int32")
TARGETS = np.roll(INPUTS, -1, axis=1)


def _model(**overrides):
    keras.utils.set_random_seed(0)
    options = {"num_layers": 4, "exit_layers": (2,), "capacity": 1.0, **overrides}
    return build_llama("llama-tiny", **options)


def test_enable_lora_adapts_every_projection_and_the_phase_trains_only_updates():
    model = _model(exit_adapter="linear")
    assert model.enable_lora(4, layers=[3, 4]) == 2 * 5  # fused qkv, o, gate, up, down
    assert not model.trainable_weights
    model.set_phase("lora")
    names = {w.path for w in model.trainable_weights}
    lora = {n for n in names if "lora_kernel" in n}
    assert len(lora) == 2 * 5 * 2
    assert all(n.startswith(("block_3/", "block_4/")) for n in lora)
    # Besides the updates: the non-final exit's adapter and norm; no base weight.
    assert names - lora == {
        w.path
        for w in model.weights
        if w.path.startswith(("block_2/exit_adapter", "block_2/exit_norm"))
    }
    model.set_phase("frozen")
    assert model.merge_lora() == 10 and model.merge_lora() == 0


def test_lora_interface_rejects_misuse():
    model = _model()
    with pytest.raises(ValueError, match="phase 'lora' needs LoRA updates"):
        model.set_phase("lora")
    with pytest.raises(ValueError, match=r"layers must be 1-based layers in \[1, 4\]; got \[0\]"):
        model.enable_lora(4, layers=[0])
    with pytest.raises(ValueError, match="kernel_layout='out_in'"):
        _model(kernel_layout="in_out").enable_lora(4)


def test_dropout_rates_grow_exponentially_to_the_top():
    rates = dropout_rates(3, 7, 0.2)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    assert all(a < b for a, b in zip(rates, rates[1:]))
    assert rates[2] == pytest.approx(0.2 * (2**0.5 - 1))


def test_training_moves_the_exit_towards_the_base_and_keeps_lower_layers():
    model = _model(exit_layers=(1, 3))
    states = cache_exit_states(model, INPUTS, TARGETS)
    before = evaluate_exit_heads(model, states)
    below = np.asarray(model(INPUTS)["exit_logits"][0])  # exit 1: under the tuned layers
    weights = {w.path: np.asarray(w).copy() for w in model.weights}
    logs = train_lora_exits(
        model,
        INPUTS,
        TARGETS,
        steps=40,
        rank=4,
        first_layer=2,
        batch_size=4,
        learning_rate=3e-3,
        layer_dropout=0.1,
    )
    assert logs["first_layer"] == 2 and logs["projections"] == 3 * 5
    after_weights = {w.path: np.asarray(w) for w in model.weights}
    assert set(after_weights) == set(weights)  # merged: no LoRA weights are left
    changed = {p for p in weights if not np.array_equal(weights[p], after_weights[p])}
    kernels = {projection.kernel.path for projection in model.lora_projections([2, 3, 4])}
    assert changed and changed <= kernels | {"block_3/exit_norm/scale"}
    assert changed & kernels
    # Layer 1 and its exit are exactly the base's.
    np.testing.assert_array_equal(np.asarray(model(INPUTS)["exit_logits"][0]), below)
    after = evaluate_exit_heads(model, cache_exit_states(model, INPUTS, TARGETS))
    # The tuned exit's KL to the tuned model's final layer falls: the exit and the final
    # layer agree more, which is what exits need.
    assert after[3]["kl_to_final"] < 0.8 * before[3]["kl_to_final"], (before, after)


def test_training_rejects_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match=r"first_layer must be in \[1, 4\]; got 9"):
        train_lora_exits(model, INPUTS, TARGETS, steps=1, first_layer=9)
    with pytest.raises(ValueError, match="layer_dropout must be in"):
        train_lora_exits(model, INPUTS, TARGETS, steps=1, layer_dropout=1.0)
    with pytest.raises(ValueError, match="steps must be an int >= 1; got 0"):
        train_lora_exits(model, INPUTS, TARGETS, steps=0)
    with pytest.raises(ValueError, match="equal non-empty"):
        train_lora_exits(model, INPUTS, TARGETS[:, :4], steps=1)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        train_lora_exits(model, INPUTS + 256, TARGETS, steps=1)
    with pytest.raises(ValueError, match="no exit below its last layer"):
        train_lora_exits(_model(exit_layers=()), INPUTS, TARGETS, steps=1)
