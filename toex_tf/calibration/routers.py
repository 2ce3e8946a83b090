"""Calibrating a model's learned decision layers on sample text: the decode-time
thresholds of the FFN skip routers (`calibrate_routers`), the share they route
(`routed_fraction`), and the exit-gate threshold for a target depth
(`exit_depth_threshold`)."""

import math

import numpy as np
from keras import ops

from toex_tf.inference.criteria import first_passing
from toex_tf.layers.skip_router import SkipRouter
from toex_tf.training.llama_training import forward_exits


def _batches(token_ids, batch_size):
    token_ids = np.asarray(token_ids, "int32")
    if token_ids.ndim != 2 or token_ids.shape[0] == 0 or token_ids.shape[1] == 0:
        raise ValueError(
            f"token_ids must be a non-empty (batch, seq) array; got {token_ids.shape}."
        )
    for start in range(0, len(token_ids), batch_size):
        yield token_ids[start : start + batch_size]


ALLOCATIONS = ("layer", "global")


def calibrate_routers(
    model, token_ids, capacity=None, batch_size: int = 8, allocation: str = "layer"
) -> list[float]:
    """Sets every router's decode-time `predictor_threshold` so that a `capacity` share
    of the calibration tokens runs its FFN.

    `allocation="layer"`: every layer routes that share. Layer by layer: a layer's
    threshold is set before the next layer's inputs are computed, so each layer is
    calibrated on the inputs it sees at decode time (with the earlier layers routing
    causally).

    `allocation="global"`: one threshold for every layer, so that the share of all
    (token, layer) pairs is `capacity` and a layer whose predictor scores higher keeps
    more tokens. This needs predictors on one scale across layers (those of
    `toex_tf.training.router_predictors`). The threshold is set from the full-depth
    states, then once more from the states under its own causal routing.

    Args:
        model: a `HierarchicalLlama` with routers.
        token_ids: int `(n, seq)` calibration windows.
        capacity: float in (0, 1] or None (each router's training capacity; `"global"`
            needs a number).
        batch_size: windows per forward pass.
        allocation: `"layer"` or `"global"`.

    Returns:
        The thresholds, one per layer.
    """
    routers = model.routers
    if not routers:
        raise ValueError("the model has no routers (capacity=1.0): nothing to calibrate.")
    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}; got {allocation!r}.")
    if allocation == "global":
        return _calibrate_global(model, token_ids, capacity, batch_size)
    batches = list(_batches(token_ids, batch_size))
    hidden = [model.embed_tokens(ops.convert_to_tensor(b)) for b in batches]
    thresholds = []
    for block in model.blocks:
        router = block.block.ffn
        if isinstance(router, SkipRouter):
            # The block's own pass, for the router's input; the threshold is set before the
            # block runs again with it, so later layers see decode-time routing.
            inputs = [_outputs(block(h, return_ffn_input=True))[-1] for h in hidden]
            logits = [np.asarray(router.predictor_logits(x)).ravel() for x in inputs]
            logits = np.concatenate(logits)
            thresholds.append(router.calibrate_predictor_threshold(logits, capacity))
        hidden = [_outputs(block(h, routing="predictor"))[0] for h in hidden]
    return thresholds


def _calibrate_global(model, token_ids, capacity, batch_size) -> list[float]:
    if capacity is None or isinstance(capacity, bool) or not 0.0 < float(capacity) <= 1.0:
        raise ValueError(f"global allocation needs a capacity in (0, 1]; got {capacity!r}.")
    threshold = None
    for routing in ("all", "predictor"):
        logits = []
        for batch in _batches(token_ids, batch_size):
            inputs = []
            forward_exits(model, batch, routing=routing, router_inputs=inputs)
            logits += [
                np.asarray(r.predictor_logits(x)).ravel()
                for r, x in zip(model.routers, inputs, strict=True)
            ]
        pooled = np.concatenate(logits)
        # Every router gets the pooled quantile; `calibrate_predictor_threshold` on the
        # pool computes it the same way as for one layer.
        threshold = model.routers[0].calibrate_predictor_threshold(pooled, capacity)
        for router in model.routers[1:]:
            router.predictor_threshold.assign(threshold)
    return [threshold] * len(model.routers)


def _outputs(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def routed_fraction(model, token_ids, batch_size: int = 8, start: int = 0) -> float:
    """The share of (token, layer) pairs whose FFN runs under causal (decode) routing,
    counting positions from `start` on (for example the generated ones only)."""
    routed, total = 0, 0
    for batch in _batches(token_ids, batch_size):
        inputs = []
        forward_exits(model, batch, routing="predictor", router_inputs=inputs)
        for router, x in zip(model.routers, inputs, strict=True):
            decisions = np.asarray(router.predictor_route(x))[:, start:]
            routed += int(decisions.sum())
            total += decisions.size
    if total == 0:
        raise ValueError("the model has no routers (capacity=1.0).")
    return routed / total


def exit_depth_threshold(model, token_ids, target_layer: float, batch_size: int = 8) -> float:
    """The gate threshold whose first-passing-exit depth averages `target_layer` on
    these tokens (teacher-forced, causal routing): a bisection over [0, 1]."""
    if not model.gates:
        raise ValueError("the model has no exit gates.")
    if not 1 <= target_layer <= model.num_layers:
        raise ValueError(f"target_layer must be in [1, {model.num_layers}]; got {target_layer}.")
    confidences = []
    for batch in _batches(token_ids, batch_size):
        states = forward_exits(model, batch, routing="predictor")["normed"][:-1]
        confidences.append(
            np.stack([np.asarray(g(s)) for g, s in zip(model.gates, states, strict=True)])
        )
    confidence = np.concatenate([c.reshape(c.shape[0], -1) for c in confidences], axis=1)
    layers = np.asarray(model.exit_layers[:-1], "float64")

    depths = np.append(layers, float(model.num_layers))

    def depth(threshold):
        return float(depths[first_passing(confidence, threshold)].mean())

    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        if depth(middle) < target_layer:
            low = middle
        else:
            high = middle
    return float(high if math.isfinite(high) else 1.0)
