import keras
import numpy as np
import pytest
from roundtrip import assert_roundtrip

from toex_tf.layers import (
    EarlyExitBlock,
    LearnedExitGate,
    LightweightOutputEmbedding,
    TopKConfidenceGate,
    TransformerBlock,
)

X = np.random.default_rng(0).normal(size=(2, 6, 16)).astype("float32")


def _block(**kwargs):
    embedding = LightweightOutputEmbedding(vocab_size=40, hidden_dim=16, shortlist_size=8)
    return EarlyExitBlock(
        TransformerBlock(num_heads=2, head_dim=8, intermediate_dim=32),
        output_embedding=embedding,
        gate=TopKConfidenceGate("max_prob", threshold=0.05),
        **kwargs,
    )


def test_returns_hidden_and_exit_logits_of_the_tied_head():
    block = _block()
    hidden, logits = block(X)
    assert hidden.shape == X.shape and logits.shape == (2, 6, 40)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(block.block(X)), atol=1e-6)
    expected = np.asarray(block.exit_norm(hidden)) @ np.asarray(block.output_embedding.embeddings).T
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-4, atol=1e-5)


def test_exit_signals_come_from_the_cheap_head_and_gate():
    block = _block()
    hidden, logits, signals = block(X, return_exit_signals=True)
    ids = np.asarray(block.output_embedding.shortlist_ids)
    np.testing.assert_allclose(
        np.asarray(signals["cheap_logits"]), np.asarray(logits)[..., ids], rtol=1e-5, atol=1e-5
    )
    confidence, decision = block.gate(signals["cheap_logits"])
    np.testing.assert_array_equal(np.asarray(signals["exit"]), np.asarray(decision))
    _, _, never = block(X, return_exit_signals=True, threshold=1.0)
    assert not np.asarray(never["exit"]).any()


def test_block_without_exit_head():
    block = EarlyExitBlock(TransformerBlock(num_heads=2, head_dim=8, intermediate_dim=32))
    out = block(X)
    assert not block.has_exit and out.shape == X.shape
    with pytest.raises(ValueError, match="no exit head"):
        block(X, return_exit_signals=True)


def test_layer_dropout_skips_whole_sequences_in_training_only():
    block = _block(layer_dropout=0.5, seed=3)
    full, _ = block(X)
    x = np.repeat(X[:1], 64, axis=0)
    hidden, _ = block(x, training=True)
    skipped = np.all(np.isclose(np.asarray(hidden), x), axis=(1, 2))
    assert 10 < skipped.sum() < 54  # about half of 64 rows
    kept = ~skipped
    np.testing.assert_allclose(
        np.asarray(hidden)[kept], np.repeat(np.asarray(full)[:1], kept.sum(), 0), atol=1e-5
    )
    inference, _ = block(x, training=False)
    assert not np.all(np.isclose(np.asarray(inference), x), axis=(1, 2)).any()


def test_kv_cache_passes_through():
    block = _block()
    cache = np.zeros((2, 2, 2, 6, 8), "float32")
    hidden, logits, new_cache = block(X, cache=cache, cache_update_index=0)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(block(X)[0]), atol=1e-5)
    assert np.abs(np.asarray(new_cache)).sum() > 0


def test_bad_arguments():
    with pytest.raises(TypeError, match="block"):
        EarlyExitBlock("block")
    with pytest.raises(TypeError, match="output_embedding"):
        EarlyExitBlock(TransformerBlock(2, 8, 32), output_embedding=keras.layers.Dense(3))
    with pytest.raises(ValueError, match="layer_dropout"):
        EarlyExitBlock(TransformerBlock(2, 8, 32), layer_dropout=1.0)


def test_roundtrip(tmp_path):
    assert_roundtrip(_block(), X, tmp_path, atol=1e-5)
    assert_roundtrip(_block(), X, tmp_path, call_kwargs={"return_exit_signals": True}, atol=1e-5)


def _learned_gate(hidden_units=4):
    return LearnedExitGate(hidden_units, kernel_initializer="glorot_uniform")


def test_learned_gate_reads_the_normed_hidden_state():
    block = _block(learned_gate=_learned_gate())
    hidden, _, signals = block(X, return_exit_signals=True)
    expected = block.learned_gate(block.exit_norm(hidden))
    np.testing.assert_allclose(
        np.asarray(signals["learned_confidence"]), np.asarray(expected), atol=1e-6
    )
    assert signals["learned_confidence"].shape == (2, 6)
    gate_weights = {id(w) for w in block.learned_gate.weights}
    assert len(gate_weights) == 4 and gate_weights <= {id(w) for w in block.weights}


def test_learned_gate_needs_an_exit_head():
    with pytest.raises(ValueError, match="learned_gate needs an exit head"):
        EarlyExitBlock(TransformerBlock(2, 8, 32), learned_gate=LearnedExitGate())
    with pytest.raises(TypeError, match="learned_gate"):
        _block(learned_gate=TopKConfidenceGate())


def test_learned_gate_roundtrip(tmp_path):
    block = _block(learned_gate=_learned_gate())
    loaded = assert_roundtrip(
        block, X, tmp_path, call_kwargs={"return_exit_signals": True}, atol=1e-5
    )
    loaded_block = [layer for layer in loaded.layers if isinstance(layer, EarlyExitBlock)][0]
    assert isinstance(loaded_block.learned_gate, LearnedExitGate)
    assert loaded_block.learned_gate.hidden_units == 4


def test_config_without_learned_gate_key_still_loads():
    """Blocks saved before learned gates existed have no `learned_gate` key."""
    config = _block().get_config()
    del config["learned_gate"]
    block = EarlyExitBlock.from_config(config)
    hidden, logits = block(X)
    assert block.learned_gate is None and logits.shape == (2, 6, 40)


def test_shared_output_embedding_stays_shared_through_keras_file(tmp_path):
    """Two exits share one tied embedding; a .keras reload must keep one matrix."""
    embedding = LightweightOutputEmbedding(vocab_size=40, hidden_dim=16, shortlist_size=8)
    ids = keras.Input((None,), dtype="int32")
    x = embedding(ids, mode="embed")
    first = EarlyExitBlock(TransformerBlock(2, 8, 32), output_embedding=embedding)
    second = EarlyExitBlock(TransformerBlock(2, 8, 32), output_embedding=embedding)
    x, logits_1 = first(x)
    x, logits_2 = second(x)
    model = keras.Model(ids, [logits_1, logits_2])
    assert len(model.trainable_weights) == len({id(w) for w in model.trainable_weights})
    path = tmp_path / "shared.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    tokens = np.array([[1, 2, 3, 4]], "int32")
    for a, b in zip(model(tokens), loaded(tokens)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    blocks = [layer for layer in loaded.layers if isinstance(layer, EarlyExitBlock)]
    assert blocks[0].output_embedding is blocks[1].output_embedding
