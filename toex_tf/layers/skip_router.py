"""`SkipRouter`: Mixture-of-Depths capacity routing around a sublayer (the FFN)."""

import math

import keras
import numpy as np
from keras import ops

ROUTINGS = ("top_k", "predictor", "all")


@keras.saving.register_keras_serializable(package="toex_tf")
class SkipRouter(keras.layers.Layer):
    """Runs the wrapped sublayer (the FFN) on a share of the tokens only.

    A linear router scores each token. In training, the top `ceil(capacity * seq)`
    tokens of each sequence are gathered, sent through the sublayer and scattered back;
    the rest contribute zero (they ride the residual stream unchanged). The number of
    routed tokens is static, so shapes stay static and the saved FLOPs are real.

    Top-k over the sequence is not causal: whether token t is routed depends on later
    tokens. Decoding therefore uses a *causal predictor*, a small MLP on the token's own
    (gradient-stopped) input trained with binary cross-entropy to predict top-k
    membership (Mixture-of-Depths §3.5).

    The routed output is multiplied by `sigmoid(r) / stop_gradient(sigmoid(r))`: its
    value is exactly 1, so a frozen pretrained FFN keeps its output, while the router
    still receives a gradient through its score.

    Added losses (in training, scaled by their weights):
        - router z-loss, `mean(r^2)`: keeps router logits small and stable;
        - entropy, the mean binary entropy of `sigmoid(r)`: pushes decisions to be crisp;
        - predictor BCE against the top-k membership.

    Args:
        layer: the wrapped `keras.layers.Layer` (or its serialized config), mapping
            `(batch, tokens, hidden)` to the same shape, position-wise.
        capacity: float in (0, 1], the share of tokens routed through `layer`.
            Defaults to `0.5`.
        z_loss_weight: float. Defaults to `1e-3`.
        entropy_weight: float. Defaults to `1e-3`.
        predictor_weight: float. Defaults to `1e-2`.
        predictor_hidden_dim: int, width of the predictor MLP. Defaults to `64`.
        **kwargs: base `keras.layers.Layer` arguments.

    Call arguments:
        inputs: `(batch, seq, hidden)`, the (normalised) sublayer input.
        training: bool.
        routing: str or None, one of `"top_k"` (static capacity), `"predictor"`
            (causal, for decoding: tokens whose predictor logit exceeds
            `predictor_threshold` run the sublayer, and it is not run at all when none
            does), `"all"` (no routing). `None`: `"top_k"` in
            training, `"predictor"` otherwise.

    Returns:
        `(batch, seq, hidden)`: the sublayer output for routed tokens, zero elsewhere.

    Example:
    >>> router = SkipRouter(FeedForward(intermediate_dim=64), capacity=0.5)
    >>> delta = router(np.random.rand(2, 8, 16).astype("float32"), training=True)

    References:
        Raposo et al., "Mixture-of-Depths: Dynamically allocating compute in
        transformer-based language models", 2024.
    """

    def __init__(
        self,
        layer,
        capacity: float = 0.5,
        z_loss_weight: float = 1e-3,
        entropy_weight: float = 1e-3,
        predictor_weight: float = 1e-2,
        predictor_hidden_dim: int = 64,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if isinstance(layer, dict):
            layer = keras.saving.deserialize_keras_object(layer)
        if not isinstance(layer, keras.layers.Layer):
            raise TypeError(f"layer must be a keras Layer; got {type(layer).__name__}.")
        if isinstance(capacity, bool) or not 0.0 < float(capacity) <= 1.0:
            raise ValueError(f"capacity must be in (0, 1]; got {capacity!r}.")
        self.layer = layer
        self.capacity = float(capacity)
        self.z_loss_weight = z_loss_weight
        self.entropy_weight = entropy_weight
        self.predictor_weight = predictor_weight
        self.predictor_hidden_dim = predictor_hidden_dim

    def build(self, input_shape):
        if not self.layer.built:  # a deserialized layer arrives built
            self.layer.build(input_shape)
        self.router_dense = keras.layers.Dense(1, dtype=self.dtype_policy, name="router")
        self.router_dense.build(input_shape)
        self.predictor_hidden = keras.layers.Dense(
            self.predictor_hidden_dim,
            activation="gelu",
            dtype=self.dtype_policy,
            name="predictor_hidden",
        )
        self.predictor_hidden.build(input_shape)
        self.predictor_output = keras.layers.Dense(1, dtype=self.dtype_policy, name="predictor")
        self.predictor_output.build(tuple(input_shape[:-1]) + (self.predictor_hidden_dim,))
        # Decode-time cut on the predictor logit; `calibrate_predictor_threshold` sets it so
        # that a `capacity` share of real tokens routes.
        self.predictor_threshold = self.add_weight(
            name="predictor_threshold",
            shape=(),
            initializer="zeros",
            trainable=False,
            dtype="float32",
            autocast=False,
        )

    def routed_count(self, seq_len: int) -> int:
        """Tokens routed per sequence of `seq_len` in top-k mode."""
        return max(1, min(seq_len, math.ceil(self.capacity * seq_len)))

    def calibrate_predictor_threshold(self, predictor_logits, capacity=None) -> float:
        """Sets `predictor_threshold` to route a `capacity` share of these tokens.

        Args:
            predictor_logits: the `predictor_logits` of calibration tokens (any shape).
            capacity: float in (0, 1]; None: this router's training capacity.

        Returns:
            The threshold: the `1 - capacity` quantile of the logits.
        """
        capacity = self.capacity if capacity is None else float(capacity)
        if isinstance(capacity, bool) or not 0.0 < capacity <= 1.0:
            raise ValueError(f"capacity must be in (0, 1]; got {capacity!r}.")
        logits = np.asarray(ops.convert_to_numpy(predictor_logits), "float64").ravel()
        if logits.size == 0:
            raise ValueError("calibration needs at least one token's predictor logit.")
        threshold = -np.inf if capacity >= 1.0 else np.quantile(logits, 1.0 - capacity)
        threshold = float(max(threshold, np.finfo("float32").min))
        self.predictor_threshold.assign(threshold)
        return threshold

    def router_logits(self, inputs):
        """Float32 router scores `(batch, seq)`."""
        return ops.cast(ops.squeeze(self.router_dense(inputs), -1), "float32")

    def predictor_logits(self, inputs):
        """Float32 causal predictor scores `(batch, seq)`; > 0 means "route this token"."""
        hidden = self.predictor_hidden(ops.stop_gradient(inputs))
        return ops.cast(ops.squeeze(self.predictor_output(hidden), -1), "float32")

    def call(self, inputs, training=None, routing=None):
        if routing is None:
            routing = "top_k" if training else "predictor"
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}; got {routing!r}.")
        if routing == "all" or (routing == "top_k" and self.capacity >= 1.0):
            return self.layer(inputs, training=training)
        if routing == "predictor":
            return self._predictor_call(inputs, training)
        return self._top_k_call(inputs, training)

    def predictor_route(self, inputs):
        """Bool `(batch, seq)`: the causal decision to run the sublayer on each token."""
        return ops.greater(self.predictor_logits(inputs), self.predictor_threshold)

    def _predictor_call(self, inputs, training):
        route = self.predictor_route(inputs)

        def run():
            output = self.layer(inputs, training=training)
            return output * ops.cast(route, output.dtype)[..., None]

        # The sublayer really is skipped when no token of the batch routes (at decode
        # time: one token per row). A token that skips still wrote its attention K/V.
        return ops.cond(ops.any(route), run, lambda: ops.zeros_like(inputs))

    def _top_k_call(self, inputs, training):
        seq_len = inputs.shape[1]
        if seq_len is None:
            raise ValueError("top_k routing needs a static sequence length.")
        k = self.routed_count(seq_len)
        logits = self.router_logits(inputs)
        _, indices = ops.top_k(logits, k=k)  # (batch, k)
        selected = ops.take_along_axis(inputs, indices[..., None], axis=1)
        weights = ops.sigmoid(ops.take_along_axis(logits, indices, axis=1))
        scale = weights / ops.stop_gradient(weights)
        routed = self.layer(selected, training=training)
        routed = routed * ops.cast(scale, routed.dtype)[..., None]
        batch = ops.shape(inputs)[0]
        batch_ids = ops.broadcast_to(ops.arange(batch, dtype="int32")[:, None], ops.shape(indices))
        scatter_indices = ops.stack(
            [ops.reshape(batch_ids, (-1,)), ops.reshape(ops.cast(indices, "int32"), (-1,))],
            axis=-1,
        )
        output = ops.scatter(
            scatter_indices,
            ops.reshape(routed, (-1, ops.shape(inputs)[-1])),
            ops.shape(inputs),
        )
        if training:
            self._add_router_losses(inputs, logits, indices)
        return output

    def _add_router_losses(self, inputs, logits, indices):
        membership = ops.max(ops.one_hot(indices, ops.shape(logits)[1], dtype="float32"), axis=1)
        probs = ops.sigmoid(logits)
        eps = 1e-6
        entropy = -(probs * ops.log(probs + eps) + (1 - probs) * ops.log(1 - probs + eps))
        predictor_loss = ops.mean(
            ops.binary_crossentropy(
                ops.stop_gradient(membership), self.predictor_logits(inputs), from_logits=True
            )
        )
        self.add_loss(
            self.z_loss_weight * ops.mean(ops.square(logits))
            + self.entropy_weight * ops.mean(entropy)
            + self.predictor_weight * predictor_loss
        )

    def compute_output_spec(self, inputs, training=None, routing=None):
        return keras.KerasTensor(inputs.shape, self.compute_dtype)

    def get_config(self):
        return {
            **super().get_config(),
            "layer": keras.saving.serialize_keras_object(self.layer),
            "capacity": self.capacity,
            "z_loss_weight": self.z_loss_weight,
            "entropy_weight": self.entropy_weight,
            "predictor_weight": self.predictor_weight,
            "predictor_hidden_dim": self.predictor_hidden_dim,
        }
