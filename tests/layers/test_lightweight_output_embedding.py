import numpy as np
import pytest
from roundtrip import assert_roundtrip

from toex_tf.layers import LightweightOutputEmbedding

HIDDEN = np.random.default_rng(0).normal(size=(2, 3, 16)).astype("float32")


def test_embed_and_full_logits_are_tied():
    layer = LightweightOutputEmbedding(vocab_size=50, hidden_dim=16, shortlist_size=8)
    vectors = np.asarray(layer(np.array([[3, 7]]), mode="embed"))
    matrix = np.asarray(layer.embeddings)
    np.testing.assert_allclose(vectors[0], matrix[[3, 7]])
    logits = np.asarray(layer(HIDDEN, mode="logits"))
    np.testing.assert_allclose(logits, HIDDEN @ matrix.T, rtol=1e-5, atol=1e-6)


def test_shortlist_logits_are_the_full_logits_of_the_shortlist():
    layer = LightweightOutputEmbedding(vocab_size=50, hidden_dim=16, shortlist_size=8)
    counts = np.zeros(50)
    frequent = np.array([1, 4, 9, 16, 25, 36, 42, 49])
    counts[frequent] = np.arange(100, 108)
    layer(HIDDEN)  # build
    layer.set_shortlist_from_counts(counts)
    np.testing.assert_array_equal(np.asarray(layer.shortlist_ids), frequent)
    cheap = np.asarray(layer(HIDDEN, mode="cheap_logits"))
    full = np.asarray(layer(HIDDEN, mode="logits"))
    assert cheap.shape == (2, 3, 8)
    np.testing.assert_allclose(cheap, full[..., frequent], rtol=1e-5, atol=1e-6)


def test_low_rank_at_full_rank_reproduces_full_logits_and_tracks_refresh():
    layer = LightweightOutputEmbedding(vocab_size=40, hidden_dim=16, mode="low_rank", rank=16)
    full = np.asarray(layer(HIDDEN, mode="logits"))
    np.testing.assert_allclose(np.asarray(layer(HIDDEN, mode="cheap_logits")), full, atol=1e-4)
    layer.embeddings.assign(np.asarray(layer.embeddings) * 2.0)
    stale = np.asarray(layer(HIDDEN, mode="cheap_logits"))
    layer.refresh_low_rank()
    fresh = np.asarray(layer(HIDDEN, mode="cheap_logits"))
    np.testing.assert_allclose(fresh, 2 * full, atol=1e-4)
    assert np.abs(stale - fresh).max() > 1e-3


def test_low_rank_truncation_is_an_approximation():
    layer = LightweightOutputEmbedding(vocab_size=40, hidden_dim=16, mode="low_rank", rank=4)
    full = np.asarray(layer(HIDDEN, mode="logits"))
    cheap = np.asarray(layer(HIDDEN, mode="cheap_logits"))
    assert cheap.shape == full.shape
    error = np.linalg.norm(cheap - full) / np.linalg.norm(full)
    assert 0.0 < error < 1.0


def test_cost_report():
    shortlist = LightweightOutputEmbedding(vocab_size=32000, hidden_dim=2048, shortlist_size=1024)
    report = shortlist.cost_report()
    assert report["full_head_macs"] == 32000 * 2048
    assert report["cheap_head_macs"] == 1024 * 2048
    low_rank = LightweightOutputEmbedding(32000, 2048, mode="low_rank", rank=128)
    assert low_rank.cost_report()["cheap_over_full"] == pytest.approx(
        (2048 * 128 + 128 * 32000) / (32000 * 2048)
    )


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(mode="tiny"), "mode"),
        (dict(shortlist_size=1), "shortlist_size"),
        (dict(shortlist_size=51), "shortlist_size"),
        (dict(mode="low_rank", rank=17), "rank"),
        (dict(vocab_size=0), "vocab_size"),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(ValueError, match=error):
        LightweightOutputEmbedding(**{"vocab_size": 50, "hidden_dim": 16, **kwargs})


def test_bad_shortlist():
    layer = LightweightOutputEmbedding(vocab_size=50, hidden_dim=16, shortlist_size=4)
    layer(HIDDEN)
    with pytest.raises(ValueError, match="shape"):
        layer.set_shortlist([1, 2, 3])
    with pytest.raises(ValueError, match="distinct"):
        layer.set_shortlist([1, 1, 2, 3])
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        layer.set_shortlist([1, 2, 3, 50])
    with pytest.raises(ValueError, match="mode"):
        layer(HIDDEN, mode="nope")


@pytest.mark.parametrize("mode", ["shortlist", "low_rank"])
def test_roundtrip(tmp_path, mode):
    layer = LightweightOutputEmbedding(
        vocab_size=50, hidden_dim=16, mode=mode, shortlist_size=8, rank=4
    )
    layer(HIDDEN)
    if mode == "shortlist":
        layer.set_shortlist(np.arange(40, 48))
    assert_roundtrip(layer, HIDDEN, tmp_path, call_kwargs={"mode": "cheap_logits"}, atol=1e-6)
    assert_roundtrip(layer, HIDDEN, tmp_path, call_kwargs={"mode": "logits"}, atol=1e-6)
