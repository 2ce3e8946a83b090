"""Helper for the layer round-trip tests: config rebuild and `.keras` save/load."""

import os

import keras
import numpy as np


def _assert_same(expected, got, atol):
    expected, got = keras.tree.flatten(expected), keras.tree.flatten(got)
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol)


def assert_roundtrip(layer, inputs, tmp_path, call_kwargs=None, atol=0.0):
    """Rebuilds `layer` from its config and through a `.keras` file; outputs must match."""
    call_kwargs = call_kwargs or {}
    expected = layer(inputs, **call_kwargs)

    rebuilt = layer.__class__.from_config(layer.get_config())
    rebuilt(inputs, **call_kwargs)  # build
    rebuilt.set_weights(layer.get_weights())
    _assert_same(expected, rebuilt(inputs, **call_kwargs), atol)

    inputs_spec = keras.Input(shape=inputs.shape[1:], dtype=str(inputs.dtype))
    model = keras.Model(inputs_spec, layer(inputs_spec, **call_kwargs))
    path = os.path.join(tmp_path, "layer.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    _assert_same(expected, loaded(inputs), atol)
    return loaded
