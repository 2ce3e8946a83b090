import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from toex_tf.config import PRESETS, GPTConfig, gpt_preset, resolve_exit_layers
from toex_tf.models import EarlyExitGPT, add_learned_gates, build_gpt, with_exit_signals

TOKENS = np.random.default_rng(0).integers(0, 64, size=(2, 12)).astype("int32")


def test_exit_layers_spec():
    assert resolve_exit_layers("all", 4) == (1, 2, 3, 4)
    assert resolve_exit_layers("none", 4) == (4,)
    assert resolve_exit_layers("3,1", 4) == (1, 3, 4)
    assert resolve_exit_layers([2], 4) == (2, 4)
    with pytest.raises(ValueError, match="out of range"):
        resolve_exit_layers("0,2", 4)
    with pytest.raises(ValueError, match="out of range"):
        resolve_exit_layers([5], 4)
    with pytest.raises(ValueError, match="exit_layers"):
        resolve_exit_layers("two", 4)


def test_outputs_one_logits_per_exit():
    model = build_gpt("tiny", num_layers=3, exit_layers="1")
    outputs = model(TOKENS)["exit_logits"]
    assert model.exit_layers == (1, 3)
    assert len(outputs) == 2 and all(o.shape == (2, 12, 64) for o in outputs)
    assert [b.has_exit for b in model.blocks] == [True, False, True]


def test_never_exit_equals_the_baseline_model():
    """The final exit of an all-exits model is the exits-off model with the same weights."""
    with_exits = build_gpt("tiny", num_layers=3, exit_layers="all")
    baseline = build_gpt("tiny", num_layers=3, exit_layers="none")
    weights = {w.path: w for w in with_exits.weights}
    for w in baseline.weights:
        w.assign(weights[w.path])
    final = np.asarray(with_exits(TOKENS)["exit_logits"][-1])
    np.testing.assert_allclose(np.asarray(baseline(TOKENS)["exit_logits"][0]), final, atol=1e-6)
    # An intermediate exit is a different predictor.
    assert np.abs(np.asarray(with_exits(TOKENS)["exit_logits"][0]) - final).max() > 1e-3


def test_model_is_causal():
    model = build_gpt("tiny")
    changed = TOKENS.copy()
    changed[:, 8:] = (changed[:, 8:] + 1) % 64
    a = np.asarray(model(TOKENS)["exit_logits"][-1])
    b = np.asarray(model(changed)["exit_logits"][-1])
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)


def test_signal_model_shares_weights_and_adds_cheap_logits():
    model = build_gpt("tiny")
    signals = with_exit_signals(model)(TOKENS)
    for a, b in zip(model(TOKENS)["exit_logits"], signals["exit_logits"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert signals["cheap_logits"][0].shape == (2, 12, 16)


def test_save_and_load(tmp_path):
    model = build_gpt(
        "tiny", exit_layers="1", capacity=0.5, output_embedding_mode="low_rank", low_rank=8
    )
    path = tmp_path / "gpt.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, EarlyExitGPT) and loaded.exit_layers == (1, 2)
    for a, b in zip(model(TOKENS)["exit_logits"], loaded(TOKENS)["exit_logits"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _learned_gates(model):
    return [block.learned_gate for block in model.blocks]


def test_learned_gates_on_every_non_final_exit():
    model = build_gpt("tiny", num_layers=4, exit_layers="1,3", learned_gates=True)
    gates = _learned_gates(model)
    assert [gate is not None for gate in gates] == [True, False, True, False]
    assert gates[0].hidden_units == 0 and tuple(gates[0].kernel.shape) == (16, 1)
    assert len(model(TOKENS)["exit_logits"]) == 3  # gates add weights, no outputs
    gated = build_gpt("tiny", learned_gates=True, learned_gate_units=8)
    assert _learned_gates(gated)[0].hidden_units == 8


def test_model_with_learned_gates_round_trips_through_keras_file(tmp_path):
    model = build_gpt("tiny", num_layers=3, learned_gates=True, learned_gate_units=4)
    for gate in _learned_gates(model)[:-1]:  # non-trivial gate outputs
        for weight in gate.weights:
            weight.assign(np.random.default_rng(0).normal(size=weight.shape))
    path = tmp_path / "gated.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.config.learned_gates and loaded.config.learned_gate_units == 4
    for a, b in zip(model(TOKENS)["exit_logits"], loaded(TOKENS)["exit_logits"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    hidden = np.random.default_rng(1).normal(size=(2, 5, 16)).astype("float32")
    for gate, loaded_gate in zip(_learned_gates(model)[:-1], _learned_gates(loaded)[:-1]):
        expected = np.asarray(gate(hidden))
        assert expected.std() > 0.01
        np.testing.assert_array_equal(np.asarray(loaded_gate(hidden)), expected)
    assert _learned_gates(loaded)[-1] is None


def test_config_saved_before_learned_gates_still_loads():
    config = build_gpt("tiny").get_config()
    del config["learned_gates"], config["learned_gate_units"]
    model = EarlyExitGPT.from_config(config)
    assert not model.config.learned_gates and _learned_gates(model) == [None, None]


def test_add_learned_gates_keeps_every_weight_and_output():
    model = build_gpt("tiny", num_layers=3, exit_layers="1", capacity=0.5, layer_dropout=0.1)
    gated = add_learned_gates(model, hidden_units=4)
    assert isinstance(gated, EarlyExitGPT) and gated.config.learned_gates
    assert [gate is not None for gate in _learned_gates(gated)] == [True, False, False]
    assert _learned_gates(gated)[0].hidden_units == 4
    source = {w.path: np.asarray(w) for w in model.weights}
    target = {w.path: np.asarray(w) for w in gated.weights}
    assert set(target) - set(source) == {
        f"block_1/learned_gate/{name}"
        for name in ("hidden_kernel", "hidden_bias", "kernel", "bias")
    }
    for path, value in source.items():
        np.testing.assert_array_equal(target[path], value)
    for a, b in zip(model(TOKENS)["exit_logits"], gated(TOKENS)["exit_logits"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_add_learned_gates_rejects_what_it_cannot_gate():
    with pytest.raises(TypeError, match="EarlyExitGPT"):
        add_learned_gates(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="already has learned gates"):
        add_learned_gates(build_gpt("tiny", learned_gates=True))
    with pytest.raises(ValueError, match="only the final exit"):
        add_learned_gates(build_gpt("tiny", exit_layers="none"))


def test_presets():
    assert set(PRESETS) >= {"tiny", "toex-small", "gpt2-small"}
    small = gpt_preset("toex-small")
    assert (small.hidden_dim, small.num_layers, small.num_heads) == (384, 10, 12)
    with pytest.raises(ValueError, match="unknown preset"):
        gpt_preset("gpt5")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(hidden_dim=10, num_heads=3)
    with pytest.raises(ValueError, match="gate_threshold"):
        GPTConfig(gate_threshold=1.2)
    with pytest.raises(ValueError, match="learned_gate_units"):
        GPTConfig(learned_gate_units=-1)


def test_imports_and_runs_without_tensorflow(tmp_path):
    """toex_tf, .layers and .models import with TensorFlow blocked, and a saved model
    gives the same logits on the JAX backend as on TensorFlow."""
    model = build_gpt("tiny", exit_layers="1", capacity=0.5)
    path = tmp_path / "gpt.keras"
    model.save(path)
    expected = np.asarray(model(TOKENS)["exit_logits"][0])
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'tensorflow' or name.startswith('tensorflow.'):\n"
        "            raise ImportError('tensorflow is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import keras, numpy as np, toex_tf, toex_tf.layers, toex_tf.models\n"
        f"model = keras.saving.load_model({str(path)!r})\n"
        f"tokens = np.array({TOKENS.tolist()}, 'int32')\n"
        "out = model(tokens)['exit_logits']\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, np.asarray(out[0]))\n"
        "assert 'tensorflow' not in sys.modules\n"
        "print('ok', keras.backend.backend(), len(out))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok jax 2" in result.stdout
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)
