import keras
import numpy as np
import pytest
import tensorflow as tf
from roundtrip import assert_roundtrip

from toex_tf.layers import FeedForward, SkipRouter

X = np.random.default_rng(0).normal(size=(3, 10, 16)).astype("float32")


def test_top_k_routes_exactly_capacity_tokens_and_passes_ffn_output():
    ffn = FeedForward(intermediate_dim=32)
    router = SkipRouter(ffn, capacity=0.3)
    out = np.asarray(router(X, training=True))
    routed = np.abs(out).sum(-1) > 0
    assert (routed.sum(axis=1) == 3).all()  # ceil(0.3 * 10)
    full = np.asarray(ffn(X))
    np.testing.assert_allclose(out[routed], full[routed], rtol=1e-5, atol=1e-6)
    # The routed tokens are the router's top-3 scores.
    scores = np.asarray(router.router_logits(X))
    top = np.argsort(-scores, axis=1)[:, :3]
    for row in range(3):
        assert set(np.nonzero(routed[row])[0]) == set(top[row])


def test_router_gets_a_gradient_and_losses_are_added():
    router = SkipRouter(FeedForward(intermediate_dim=32), capacity=0.5)
    router(X, training=True)
    x = tf.constant(X)
    with tf.GradientTape() as tape:
        out = router(x, training=True)
        loss = tf.reduce_sum(out**2)
    kernel = router.router_dense.kernel
    grad = tape.gradient(loss, kernel.value)
    assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0
    assert len(router.losses) == 1 and float(router.losses[0]) > 0


def test_capacity_one_is_the_plain_ffn():
    ffn = FeedForward(intermediate_dim=32)
    router = SkipRouter(ffn, capacity=1.0)
    np.testing.assert_allclose(np.asarray(router(X, training=True)), np.asarray(ffn(X)), atol=1e-6)


def test_predictor_learns_top_k_membership():
    """The causal predictor, trained only through its added loss, learns the routing."""
    inputs = keras.Input((10, 16))
    router = SkipRouter(
        FeedForward(intermediate_dim=32),
        capacity=0.5,
        predictor_weight=1.0,
        z_loss_weight=0.0,
        entropy_weight=0.0,
    )
    model = keras.Model(inputs, router(inputs))
    # The FFN output has zero loss weight: only the added router losses train.
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=lambda y, p: 0.0 * keras.ops.sum(p))
    data = np.random.default_rng(1).normal(size=(256, 10, 16)).astype("float32")

    def agreement():
        predicted = np.asarray(router.predictor_logits(data)) > 0
        scores = np.asarray(router.router_logits(data))
        member = scores >= np.sort(scores, axis=1)[:, [4]]
        return (predicted == member).mean()

    before = agreement()
    model.fit(data, data, epochs=30, batch_size=64, verbose=0)
    after = agreement()
    assert after > 0.85 and after > before + 0.1


def test_predictor_routing_masks_tokens():
    router = SkipRouter(FeedForward(intermediate_dim=32), capacity=0.5)
    out = np.asarray(router(X, training=False))
    routed = np.asarray(router.predictor_logits(X)) > 0
    assert np.all((np.abs(out).sum(-1) > 0) == routed)


@pytest.mark.parametrize("capacity", [0.0, 1.5, -0.2, True])
def test_bad_capacity(capacity):
    with pytest.raises(ValueError, match="capacity"):
        SkipRouter(FeedForward(8), capacity=capacity)


def test_bad_routing_and_layer():
    with pytest.raises(TypeError, match="layer"):
        SkipRouter("ffn")
    with pytest.raises(ValueError, match="routing"):
        SkipRouter(FeedForward(8))(X, routing="sometimes")


def test_roundtrip(tmp_path):
    router = SkipRouter(FeedForward(intermediate_dim=32, activation="swiglu"), capacity=0.4)
    assert_roundtrip(router, X, tmp_path, call_kwargs={"routing": "predictor"}, atol=1e-6)
    assert_roundtrip(router, X, tmp_path, call_kwargs={"routing": "top_k"}, atol=1e-6)
