"""Attention, RoPE, norms, FFN, positions and the transformer block."""

import numpy as np
import pytest
from roundtrip import assert_roundtrip

from toex_tf.layers import (
    CausalSelfAttention,
    CrossAttention,
    FeedForward,
    PositionEmbedding,
    RMSNorm,
    RotaryEmbedding,
    TransformerBlock,
)

RNG = np.random.default_rng(0)
X = RNG.normal(size=(2, 7, 16)).astype("float32")


@pytest.mark.parametrize("kv_heads, rope", [(4, None), (2, 10000.0), (1, 500.0)])
def test_cached_decoding_equals_uncached_forward(kv_heads, rope):
    attention = CausalSelfAttention(num_heads=4, head_dim=4, num_kv_heads=kv_heads, rope_theta=rope)
    full = np.asarray(attention(X))
    cache = np.zeros((2, 2, kv_heads, 10, 4), "float32")
    # A 3-token prompt, then one token at a time.
    out, cache = attention(X[:, :3], cache=cache, cache_update_index=0)
    steps = [np.asarray(out)]
    for t in range(3, 7):
        out, cache = attention(X[:, t : t + 1], cache=cache, cache_update_index=t)
        steps.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


def test_attention_is_causal():
    attention = CausalSelfAttention(num_heads=2, head_dim=8)
    changed = X.copy()
    changed[:, 4:] += 1.0
    a, b = np.asarray(attention(X)), np.asarray(attention(changed))
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-4


def test_padding_mask_hides_keys():
    attention = CausalSelfAttention(num_heads=2, head_dim=8)
    mask = np.ones((2, 7), "int32")
    mask[:, 2] = 0
    changed = X.copy()
    changed[:, 2] += 5.0
    a = np.asarray(attention(X, padding_mask=mask))
    b = np.asarray(attention(changed, padding_mask=mask))
    np.testing.assert_allclose(np.delete(a, 2, axis=1), np.delete(b, 2, axis=1), atol=1e-5)


def test_bad_heads_and_missing_index():
    with pytest.raises(ValueError, match="num_kv_heads"):
        CausalSelfAttention(num_heads=4, head_dim=4, num_kv_heads=3)
    attention = CausalSelfAttention(num_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="cache_update_index"):
        attention(X, cache=np.zeros((2, 2, 2, 7, 8), "float32"))


def test_rope_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(theta=10000.0)
    q = RNG.normal(size=(1, 1, 1, 8)).astype("float32")
    k = RNG.normal(size=(1, 1, 1, 8)).astype("float32")

    def score(i, j):
        rotated_q, rotated_k = rope(q, start_index=i), rope(k, start_index=j)
        return float((np.asarray(rotated_q) * np.asarray(rotated_k)).sum())

    assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


def test_rope_matches_hf_rotate_half():
    x = RNG.normal(size=(1, 3, 2, 8)).astype("float32")
    out = np.asarray(RotaryEmbedding(theta=100.0)(x, start_index=2))
    inv = 1.0 / 100.0 ** (np.arange(0, 8, 2) / 8)
    angles = np.arange(2, 5)[:, None] * inv[None]
    cos = np.cos(np.concatenate([angles, angles], -1))[None, :, None]
    sin = np.sin(np.concatenate([angles, angles], -1))[None, :, None]
    rotated = np.concatenate([-x[..., 4:], x[..., :4]], -1)
    np.testing.assert_allclose(out, x * cos + rotated * sin, atol=1e-5)


def test_cross_attention_respects_encoder_mask():
    cross = CrossAttention(num_heads=2, head_dim=8)
    encoder = RNG.normal(size=(2, 5, 16)).astype("float32")
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = encoder.copy()
    changed[0, 3:] += 10.0
    a = np.asarray(cross(X, encoder, mask))
    b = np.asarray(cross(X, changed, mask))
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)


def test_rms_norm_matches_reference():
    norm = RMSNorm(epsilon=1e-5)
    out = np.asarray(norm(X))
    expected = X / np.sqrt((X**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_swiglu_ffn_matches_reference():
    ffn = FeedForward(intermediate_dim=24, activation="swiglu", use_bias=False)
    out = np.asarray(ffn(X))
    gate, up, down = (np.asarray(d.kernel) for d in (ffn.gate_dense, ffn.up_dense, ffn.down_dense))
    g = X @ gate
    np.testing.assert_allclose(
        out, ((g / (1 + np.exp(-g))) * (X @ up)) @ down, rtol=1e-4, atol=1e-5
    )


def test_position_embedding_offsets_and_limits():
    positions = PositionEmbedding(max_length=8)
    full = np.asarray(positions(X))
    shifted = np.asarray(positions(X[:, 3:5], start_index=3))
    np.testing.assert_allclose(shifted, full[:, 3:5], atol=1e-6)
    with pytest.raises(ValueError, match="max_length"):
        positions(X[:, :2], start_index=7)
    with pytest.raises(ValueError, match="max_length"):
        PositionEmbedding(max_length=4)(X)


def test_transformer_block_variants_and_cache():
    llama = TransformerBlock(
        num_heads=4,
        head_dim=4,
        intermediate_dim=32,
        num_kv_heads=2,
        norm_type="rms_norm",
        activation="swiglu",
        use_bias=False,
        rope_theta=10000.0,
    )
    full = np.asarray(llama(X))
    cache = np.zeros((2, 2, 2, 7, 4), "float32")
    out, cache = llama(X[:, :4], cache=cache, cache_update_index=0)
    out2, _ = llama(X[:, 4:], cache=cache, cache_update_index=4)
    np.testing.assert_allclose(np.concatenate([out, out2], 1), full, atol=1e-5)
    decoder = TransformerBlock(num_heads=2, head_dim=8, intermediate_dim=32, cross_attention=True)
    encoder = RNG.normal(size=(2, 5, 16)).astype("float32")
    assert decoder(X, encoder_outputs=encoder).shape == X.shape
    with pytest.raises(ValueError, match="encoder_outputs"):
        decoder(X)
    with pytest.raises(ValueError, match="norm_type"):
        TransformerBlock(2, 8, 32, norm_type="batch_norm")


def test_supporting_layer_roundtrips(tmp_path):
    assert_roundtrip(
        CausalSelfAttention(4, 4, num_kv_heads=2, rope_theta=1e4), X, tmp_path, atol=1e-6
    )
    assert_roundtrip(TransformerBlock(2, 8, 32, capacity=0.5), X, tmp_path, atol=1e-6)
    assert_roundtrip(RMSNorm(1e-5), X, tmp_path)
    assert_roundtrip(PositionEmbedding(16), X, tmp_path)


@pytest.mark.parametrize("kernel_layout", ["in_out", "out_in"])
def test_fused_qkv_equals_three_projections(kernel_layout, tmp_path):
    """One (q; k; v) kernel gives what the three projections give: forward, cached
    decoding and the key/value-only projection of the frozen exit mode (biases too)."""
    options = dict(num_heads=4, head_dim=4, num_kv_heads=2, rope_theta=10000.0)
    options.update(kernel_layout=kernel_layout, use_bias=True)
    three = CausalSelfAttention(**options)
    fused = CausalSelfAttention(fused_qkv=True, **options)
    three.build(X.shape)
    fused.build(X.shape)
    assert fused.query_dense is None and three.qkv_dense is None
    axis = 0 if kernel_layout == "out_in" else 1  # the output units of the kernel
    rng = np.random.default_rng(3)
    projections = (three.query_dense, three.key_dense, three.value_dense)
    for dense in projections:
        dense.bias.assign(rng.normal(size=dense.bias.shape).astype("float32"))
    fused.qkv_dense.kernel.assign(
        np.concatenate([np.asarray(d.kernel) for d in projections], axis=axis)
    )
    fused.qkv_dense.bias.assign(np.concatenate([np.asarray(d.bias) for d in projections]))
    fused.output_dense.set_weights(three.output_dense.get_weights())
    np.testing.assert_allclose(np.asarray(fused(X)), np.asarray(three(X)), atol=1e-5)
    for start in (0, 3):
        for got, want in zip(
            fused.project_kv(X[:, :4], start_index=start),
            three.project_kv(X[:, :4], start_index=start),
            strict=True,
        ):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    caches = [np.zeros((2, 2, 2, 10, 4), "float32")] * 2
    for t in range(4):
        outs = []
        for index, layer in enumerate((three, fused)):
            out, caches[index] = layer(X[:, t : t + 1], cache=caches[index], cache_update_index=t)
            outs.append(np.asarray(out))
        np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(caches[1]), np.asarray(caches[0]), atol=1e-5)
    assert_roundtrip(fused, X, tmp_path)
