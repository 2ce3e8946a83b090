"""`ExitAdapter`: the token-local map in front of an exit head, through the model and
the decode engine (every exit path must read it: decode, speculative drafts, costs)."""

import numpy as np
import pytest
from roundtrip import assert_roundtrip

from toex_tf.analysis.cost import CostModel
from toex_tf.inference import (
    DecoderAdapter,
    ExitPolicy,
    decode_step,
    generate,
    generate_speculative,
    prefill,
)
from toex_tf.layers import ExitAdapter
from toex_tf.models.llama import build_llama

X = np.random.default_rng(0).normal(size=(2, 5, 16)).astype("float32")
TOKENS = np.random.default_rng(1).integers(0, 256, (2, 12)).astype("int32")


def _randomize(layer, seed=0):
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        weight.assign(rng.normal(0.0, 0.3, weight.shape).astype("float32"))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_starts_as_the_identity_and_round_trips(kind, tmp_path):
    adapter = ExitAdapter(kind, units=8)
    np.testing.assert_array_equal(np.asarray(adapter(X)), X)
    _randomize(adapter)
    out = np.asarray(adapter(X))
    assert np.abs(out - X).max() > 0.1
    assert_roundtrip(adapter, X, tmp_path)
    assert adapter.macs_per_token(16) == (16 * 16 if kind == "linear" else 2 * 16 * 8)


@pytest.mark.parametrize(
    "kwargs, error",
    [({"kind": "conv"}, "kind must be one of"), ({"units": 0}, "units must be a positive")],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        ExitAdapter(**kwargs)


def _llama(adapter="mlp"):
    model = build_llama(
        "llama-tiny",
        num_layers=3,
        exit_layers=(1, 2),
        capacity=1.0,
        exit_adapter=adapter,
        exit_adapter_units=16,
    )
    for block in model.blocks:
        if block.exit_adapter is not None:
            _randomize(block.exit_adapter, seed=block.exit_adapter.units + len(block.name))
    return model


def test_model_exits_read_the_adapter():
    model = _llama()
    assert model.blocks[0].exit_adapter is not None and model.blocks[2].exit_adapter is None
    with_adapter = np.asarray(model(TOKENS)["exit_logits"][0])
    model.blocks[0].exit_adapter.output_dense.kernel.assign(
        np.zeros(model.blocks[0].exit_adapter.output_dense.kernel.shape, "float32")
    )
    without = np.asarray(model(TOKENS)["exit_logits"][0])
    assert np.abs(with_adapter - without).max() > 1e-2


def test_decode_step_exits_through_the_adapter():
    model = _llama()
    adapter = DecoderAdapter(model)
    caches = adapter.empty_caches(2)
    _, caches = prefill(adapter, TOKENS[:, :5], caches)
    logits, exit_layer, _, _, _ = decode_step(
        adapter, ExitPolicy("unfrozen", "max_prob", 0.0), TOKENS[:, 5:6], 5, caches
    )
    layer_one = np.asarray(model(TOKENS[:, :6])["exit_logits"][0])[:, -1]
    np.testing.assert_allclose(np.asarray(logits), layer_one, atol=1e-5)
    assert (np.asarray(exit_layer) == 1).all()


def test_speculative_with_an_adapter_draft_stays_lossless():
    adapter = DecoderAdapter(_llama())
    prompt = TOKENS[:, :4]
    reference, _ = generate(adapter, prompt, 16)
    tokens, _ = generate_speculative(adapter, prompt, 16, 1, 3)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(reference))


def test_cost_model_counts_the_adapter_at_each_check():
    plain = CostModel.for_model(_llama("none"), 8)
    mlp = CostModel.for_model(_llama("mlp"), 8)
    assert mlp.check_macs - plain.check_macs == 2 * 64 * 16
    assert mlp.layer_macs == plain.layer_macs
