import numpy as np
from roundtrip import assert_roundtrip

from toex_tf.layers import CrossAttention, EncoderBlock

RNG = np.random.default_rng(0)


def test_encoder_block_round_trip(tmp_path):
    block = EncoderBlock(num_heads=2, head_dim=8, intermediate_dim=32, name="encoder_block")
    assert_roundtrip(block, RNG.normal(size=(2, 5, 16)).astype("float32"), tmp_path)


def test_encoder_block_is_bidirectional_and_ignores_padding():
    block = EncoderBlock(num_heads=2, head_dim=8, intermediate_dim=32)
    x = RNG.normal(size=(1, 6, 16)).astype("float32")
    mask = np.array([[1, 1, 1, 1, 0, 0]], "int32")
    out = np.asarray(block(x, padding_mask=mask))
    # Real positions do not see the padding: changing it changes nothing there.
    changed = x.copy()
    changed[:, 4:] = RNG.normal(size=(1, 2, 16))
    np.testing.assert_allclose(
        np.asarray(block(changed, padding_mask=mask))[:, :4], out[:, :4], atol=1e-6
    )
    # Bidirectional: the first position sees the last real one (not causal).
    later = x.copy()
    later[:, 3] = RNG.normal(size=(1, 16))
    assert np.abs(np.asarray(block(later, padding_mask=mask))[:, 0] - out[:, 0]).max() > 1e-4
    # Without the padded slots at all, the real positions come out the same.
    np.testing.assert_allclose(np.asarray(block(x[:, :4]))[:, :4], out[:, :4], atol=1e-5)


def test_cross_attention_with_projected_keys_and_values_equals_the_direct_call():
    cross = CrossAttention(num_heads=2, head_dim=8)
    queries = RNG.normal(size=(2, 3, 16)).astype("float32")
    encoder = RNG.normal(size=(2, 7, 16)).astype("float32")
    mask = np.array([[1] * 7, [1] * 4 + [0] * 3], "int32")
    direct = np.asarray(cross(queries, encoder, mask))
    cached = cross(queries, None, mask, encoder_kv=cross.project_kv(encoder))
    np.testing.assert_allclose(np.asarray(cached), direct, atol=1e-6)
