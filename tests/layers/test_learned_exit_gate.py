import keras
import numpy as np
import pytest
from roundtrip import assert_roundtrip

from toex_tf.layers import LearnedExitGate

X = np.random.default_rng(0).normal(size=(2, 6, 16)).astype("float32")


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gelu(x):  # keras.ops.gelu's default tanh approximation
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def test_untrained_gate_says_one_half_everywhere():
    confidence = np.asarray(LearnedExitGate()(X))
    assert confidence.shape == (2, 6)
    np.testing.assert_array_equal(confidence, np.full((2, 6), 0.5, "float32"))


def test_linear_probe_matches_numpy_reference():
    gate = LearnedExitGate(kernel_initializer="glorot_uniform", bias_initializer="ones")
    confidence = np.asarray(gate(X))
    logit = X @ np.asarray(gate.kernel)[:, 0] + np.asarray(gate.bias)[0]
    np.testing.assert_allclose(np.asarray(gate.logit(X)), logit, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(confidence, _sigmoid(logit), rtol=1e-5, atol=1e-6)
    assert confidence.min() >= 0.0 and confidence.max() <= 1.0
    assert confidence.std() > 0.05  # not a constant
    assert len(gate.trainable_weights) == 2


def test_hidden_layer_matches_numpy_reference():
    gate = LearnedExitGate(hidden_units=8, kernel_initializer="glorot_uniform")
    confidence = np.asarray(gate(X))
    inner = _gelu(X @ np.asarray(gate.hidden_kernel) + np.asarray(gate.hidden_bias))
    logit = inner @ np.asarray(gate.kernel)[:, 0] + np.asarray(gate.bias)[0]
    np.testing.assert_allclose(confidence, _sigmoid(logit), rtol=1e-5, atol=1e-6)
    assert [tuple(w.shape) for w in gate.weights] == [(16, 8), (8,), (8, 1), (1,)]


def test_float32_under_mixed_bfloat16():
    gate = LearnedExitGate(
        hidden_units=8, kernel_initializer="glorot_uniform", dtype="mixed_bfloat16"
    )
    hidden = keras.ops.cast(X, "bfloat16")
    confidence = gate(hidden)
    assert keras.backend.standardize_dtype(confidence.dtype) == "float32"
    assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in gate.weights)
    # Only the input is bf16: the weights and every step after it stay float32.
    reference = LearnedExitGate(hidden_units=8)
    reference.build(X.shape)
    reference.set_weights(gate.get_weights())
    rounded = np.asarray(keras.ops.cast(hidden, "float32"))
    np.testing.assert_allclose(np.asarray(confidence), np.asarray(reference(rounded)), atol=1e-6)
    # A float32 input is not rounded down to the compute dtype on the way in.
    np.testing.assert_allclose(np.asarray(gate(X)), np.asarray(reference(X)), atol=1e-6)


@pytest.mark.parametrize("hidden_units", [-1, 2.5, True, "8"])
def test_bad_hidden_units(hidden_units):
    with pytest.raises(ValueError, match="hidden_units"):
        LearnedExitGate(hidden_units=hidden_units)


@pytest.mark.parametrize("hidden_units", [0, 8])
def test_roundtrip(tmp_path, hidden_units):
    gate = LearnedExitGate(
        hidden_units, kernel_initializer="glorot_uniform", bias_initializer="ones"
    )
    loaded = assert_roundtrip(gate, X, tmp_path)
    config = loaded.layers[-1].get_config()
    assert config["hidden_units"] == hidden_units
    assert keras.initializers.get(config["bias_initializer"]).__class__.__name__ == "Ones"
