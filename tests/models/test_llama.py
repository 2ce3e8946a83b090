"""`HierarchicalLlama`: outputs, phases, saving, and decoding with routers through the engine."""

import keras
import numpy as np
import pytest

from toex_tf.calibration.routers import calibrate_routers, routed_fraction
from toex_tf.inference import DecoderAdapter, ExitPolicy, decode_step, flush_lazy, generate, prefill
from toex_tf.models import HierarchicalLlama, build_llama
from toex_tf.training.llama_training import forward_exits

RNG = np.random.default_rng(0)
TOKENS = RNG.integers(0, 256, size=(2, 16)).astype("int32")


def _model(**overrides):
    """4 layers, exits at 2 and 4, routers on every FFN, random (non-trivial) router and
    gate weights so that routing and exits really vary."""
    model = build_llama("llama-tiny", **{"num_layers": 4, "exit_layers": (2,), **overrides})
    rng = np.random.default_rng(1)
    for weight in model.weights:
        if "predictor" in weight.path or "learned_gate" in weight.path:
            if weight.trainable or "kernel" in weight.path:
                weight.assign(rng.normal(0, 0.5, weight.shape).astype("float32"))
    return model


def _calibrate(model, capacity):
    return calibrate_routers(model, TOKENS, capacity)


def test_output_contract_without_and_with_exits():
    plain = build_llama("llama-tiny", exit_layers=(), capacity=1.0)
    outputs = plain(TOKENS)
    assert set(outputs) == {"logits", "exit_logits"} and len(outputs["exit_logits"]) == 1
    assert tuple(outputs["logits"].shape) == (2, 16, 256)
    assert not plain.routers and not plain.gates
    model = _model()
    outputs = model(TOKENS)
    assert set(outputs) == {"logits", "exit_logits"}
    assert len(outputs["exit_logits"]) == 2
    np.testing.assert_array_equal(np.asarray(outputs["logits"]), outputs["exit_logits"][-1])
    assert len(model.routers) == 4 and len(model.gates) == 1


def test_phases_freeze_the_base():
    model = _model()
    assert not model.trainable_weights  # frozen after construction
    model.set_phase("routers")
    names = {w.path for w in model.trainable_weights}
    assert names and all("skip_router" in n and "/ffn/" not in n for n in names)
    model.set_phase("exits")
    names = {w.path for w in model.trainable_weights}
    assert names == {
        "block_2/learned_gate/kernel",
        "block_2/learned_gate/bias",
        "block_2/exit_norm/scale",
    }
    model.set_phase("full")
    assert {w.path for w in model.trainable_weights} > names
    model.set_phase("base")
    names = {w.path for w in model.trainable_weights}
    assert "token_embedding/embeddings" in names and "block_4/exit_norm/scale" in names
    assert any("skip_router/ffn/" in n for n in names)
    assert not any("learned_gate" in n or "/router/" in n or "predictor" in n for n in names)
    with pytest.raises(ValueError, match="phase must be one of"):
        model.set_phase("everything")


def test_keras_file_round_trip(tmp_path):
    model = _model()
    _calibrate(model, 0.5)
    path = str(tmp_path / "llama.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, HierarchicalLlama)
    for a, b in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_allclose(
        np.asarray(loaded(TOKENS)["logits"]), np.asarray(model(TOKENS)["logits"]), atol=1e-6
    )


def test_router_predictor_really_skips_and_calibration_hits_capacity():
    model = _model()
    thresholds = _calibrate(model, 0.5)
    assert len(thresholds) == 4
    router = model.routers[0]
    normed = np.asarray(RNG.normal(size=(2, 16, 64)), "float32")
    route = np.asarray(router.predictor_route(normed))
    delta = np.asarray(router(normed, routing="predictor"))
    assert (np.abs(delta[~route]) == 0).all()
    assert (np.abs(delta[route]).sum(-1) > 0).all()
    # No token routes: the sublayer's output is all zeros (it is not run).
    router.predictor_threshold.assign(1e9)
    assert not np.asarray(router(normed, routing="predictor")).any()


def test_calibrated_share_of_routed_tokens_matches_capacity():
    model = _model()
    for capacity in (0.25, 0.75):
        _calibrate(model, capacity)
        assert routed_fraction(model, TOKENS) == pytest.approx(capacity, abs=0.05)


@pytest.mark.parametrize("routing", [None, "all"])
def test_cached_decoding_with_routers_equals_uncached_forward(routing):
    model = _model()
    _calibrate(model, 0.5)
    adapter = DecoderAdapter(model, routing=routing)
    if routing is None:  # the Functional call routes causally, as decoding does
        full = np.asarray(model(TOKENS)["logits"])
    else:
        full = np.asarray(forward_exits(model, TOKENS, routing=routing)["logits"][-1])
        assert np.abs(full - np.asarray(model(TOKENS)["logits"])).max() > 1e-3
    caches = adapter.empty_caches(2)
    logits, caches = prefill(adapter, TOKENS[:, :3], caches)
    steps = [np.asarray(logits)]
    for t in range(3, 15):
        logits, _, caches, _, _ = decode_step(
            adapter, ExitPolicy("full"), TOKENS[:, t : t + 1], t, caches
        )
        steps.append(np.asarray(logits))
    np.testing.assert_allclose(np.stack(steps, 1), full[:, 2:15], atol=1e-5)


def test_never_exit_and_lazy_match_full_with_routers():
    model = _model()
    _calibrate(model, 0.5)
    adapter = DecoderAdapter(model)
    prompt = TOKENS[:, :4]
    reference, _ = generate(adapter, prompt, 12, ExitPolicy("full"))
    for mode in ("unfrozen", "frozen", "lazy"):
        tokens, exits = generate(adapter, prompt, 12, ExitPolicy(mode, "learned", 1.0))
        np.testing.assert_array_equal(np.asarray(tokens), np.asarray(reference))
        assert (np.asarray(exits) == 4).all()
    unfrozen, unfrozen_exits = generate(adapter, prompt, 12, ExitPolicy("unfrozen", "learned", 0.5))
    assert 2 in np.asarray(unfrozen_exits) and 4 in np.asarray(unfrozen_exits)
    policy = ExitPolicy("lazy", "learned", 0.5)
    lazy, lazy_exits, state = generate(adapter, prompt, 12, policy, return_state=True)
    np.testing.assert_array_equal(np.asarray(lazy), np.asarray(unfrozen))
    np.testing.assert_array_equal(np.asarray(lazy_exits), np.asarray(unfrozen_exits))
    # After a flush, every layer's cache equals a full-depth pass over the same tokens.
    caches, _ = flush_lazy(adapter, policy, state["caches"], state["lazy"], state["next_position"])
    sequence = np.concatenate([prompt, np.asarray(lazy)[:, :-1]], axis=1)
    exact = adapter.empty_caches(2, policy.max_pending)
    _, exact = prefill(adapter, sequence, exact)
    length = sequence.shape[1]
    for ours, reference_cache in zip(caches, exact, strict=True):
        np.testing.assert_allclose(
            np.asarray(ours)[:, :, :, :length],
            np.asarray(reference_cache)[:, :, :, :length],
            atol=1e-5,
        )


def test_adapter_rejects_a_cache_longer_than_the_model():
    with pytest.raises(ValueError, match="exceeds the model's max_length"):
        DecoderAdapter(_model(), max_length=1000)


def test_gumbel_gate_samples_are_hard_with_a_straight_through_gradient():
    import tensorflow as tf

    from toex_tf.layers import GumbelExitGate

    gate = GumbelExitGate(backward_temperature=2.0, kernel_initializer="glorot_uniform")
    hidden = tf.constant(RNG.normal(size=(4, 8, 16)), "float32")
    gate.build(hidden.shape)
    with tf.GradientTape() as tape:
        sample = gate.sample(hidden, seed=0)
        loss = tf.reduce_sum(sample)
    values = np.asarray(sample)
    assert set(np.unique(values)) <= {0.0, 1.0} and 0 < values.mean() < 1
    gradient = tape.gradient(loss, gate.kernel)
    assert gradient is not None and np.abs(np.asarray(gradient)).max() > 0
    # Without noise the hard decision is the sign of the logit: confidence > 0.5.
    hard = np.asarray(gate.sample(hidden, noise=False))
    np.testing.assert_array_equal(hard, (np.asarray(gate(hidden)) > 0.5).astype("float32"))
    with pytest.raises(ValueError, match="backward_temperature must be > 0"):
        GumbelExitGate(backward_temperature=0.0)


def test_row_splits_keep_decoding_exact(monkeypatch):
    """Every product split in row blocks (`set_row_splits`): the same logits and tokens
    in full, frozen and lazy decoding as unsplit (fused qkv, routers and exits on)."""
    import toex_tf.layers.linear as linear_module

    model = _model()
    _calibrate(model, 0.5)
    adapter = DecoderAdapter(model)
    prompt = TOKENS[:, :4]
    policies = [ExitPolicy("full")] + [ExitPolicy(m, "learned", 0.5) for m in ("frozen", "lazy")]
    whole = [generate(adapter, prompt, 10, policy) for policy in policies]
    caches = adapter.empty_caches(2)
    whole_logits, _ = prefill(adapter, TOKENS[:, :6], caches)
    monkeypatch.setattr(linear_module, "MIN_ROWS_PER_PART", 2)
    linear_module.set_row_splits(3)
    try:
        split_logits, _ = prefill(adapter, TOKENS[:, :6], adapter.empty_caches(2))
        split = [generate(adapter, prompt, 10, policy) for policy in policies]
    finally:
        linear_module.set_row_splits(1)
    np.testing.assert_allclose(np.asarray(split_logits), np.asarray(whole_logits), atol=1e-5)
    for (tokens, exits), (want_tokens, want_exits) in zip(split, whole, strict=True):
        np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want_tokens))
        np.testing.assert_array_equal(np.asarray(exits), np.asarray(want_exits))
