"""Causal FFN-skip predictors fitted on a frozen pretrained base, layer by layer.

`--phase=routers` trains each `SkipRouter` end to end: top-k routing in the forward
pass, the KL to full depth as the loss. On a 30-layer pretrained base that costs a
forward and backward pass of the whole model per step (13 s for 4 x 128 tokens on 2
CPU cores, measured on SmolLM2-135M) and the routed model starts far from the base.

This module fits only what decoding reads, the router's causal predictor, to a target
computed from the frozen base itself: how much each token's FFN changes its residual
stream, `log(|ffn(x)| / |h|)` with `h` the stream before the FFN. Tokens whose FFN
barely changes them are the ones that can skip it. Layer `l` is fitted on the states of
the full-depth model, then the next layer's states are computed; only one layer's
states are held at a time (`tokens * hidden` floats).

The predictor's output is then the predicted log relative change, on one scale for
every layer, so a decode-time threshold can be set per layer (each routes the same
share, `calibrate_routers`) or once for the whole model (`allocation="global"`: the
layers whose FFNs matter more keep more tokens).

Gradient-free targets like this one are a proxy: DESIGN.md measured that even the
non-causal oracle that keeps each sequence's largest FFN outputs costs +39% perplexity
at capacity 0.9 on layers 10-29 of the frozen SmolLM2.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from toex_tf.layers.skip_router import SkipRouter


def relative_ffn_change(stream, delta) -> np.ndarray:
    """`log(|delta| / |stream|)` per token: float64 `(tokens,)`."""
    stream = np.asarray(stream, "float64").reshape(-1, np.shape(stream)[-1])
    delta = np.asarray(delta, "float64").reshape(-1, np.shape(delta)[-1])
    tiny = 1e-12
    return np.log(np.linalg.norm(delta, axis=-1) + tiny) - np.log(
        np.linalg.norm(stream, axis=-1) + tiny
    )


def _check_tokens(model, token_ids) -> np.ndarray:
    token_ids = np.asarray(token_ids)
    if token_ids.ndim != 2 or token_ids.shape[0] < 2 or token_ids.shape[1] == 0:
        raise ValueError(
            f"token_ids must be an int (windows, seq) array with at least 2 windows; got "
            f"shape {token_ids.shape}."
        )
    if not np.issubdtype(token_ids.dtype, np.integer):
        raise TypeError(f"token_ids must be integer ids; got dtype {token_ids.dtype}.")
    vocab = model.config.vocab_size
    if token_ids.min() < 0 or token_ids.max() >= vocab:
        raise ValueError(
            f"token ids must be in [0, {vocab}); got [{token_ids.min()}, {token_ids.max()}]."
        )
    return token_ids.astype("int32")


def fit_router_predictors(
    model,
    token_ids,
    batch_size: int = 8,
    epochs: int = 4,
    learning_rate: float = 1e-3,
    fit_batch_size: int = 256,
    held_out_share: float = 0.125,
    seed: int = 0,
    log=None,
) -> list[dict]:
    """Fits every router's causal predictor to the relative FFN change (module doc).

    Args:
        model: a `HierarchicalLlama` with routers (`capacity < 1`), its base frozen.
        token_ids: int `(windows, seq)` text of the base's tokenizer; the last
            `held_out_share` of the windows only scores the fit.
        batch_size: windows per forward pass.
        epochs, learning_rate, fit_batch_size: each predictor's fit (Adam, squared error).
        held_out_share: float in (0, 1).
        seed: shuffling seed.
        log: called with one line per layer; None: silent.

    Returns:
        One dict per routed layer: `layer`, `target_mean`, `target_std`, `held_out_mse`,
        `held_out_correlation` (Pearson, predicted against actual) and
        `top_half_recall` (the share of the held-out tokens with the larger half of the
        actual change that the predictor also puts in its larger half).
    """
    token_ids = _check_tokens(model, token_ids)
    if not model.routers:
        raise ValueError("the model has no routers (capacity=1.0): nothing to fit.")
    if not 0.0 < held_out_share < 1.0:
        raise ValueError(f"held_out_share must be in (0, 1); got {held_out_share!r}.")
    split = len(token_ids) - max(1, int(round(held_out_share * len(token_ids))))
    if split < 1:
        raise ValueError(f"need at least one training window; got {len(token_ids)} windows.")
    batches = [token_ids[i : i + batch_size] for i in range(0, len(token_ids), batch_size)]
    hidden = [model.embed_tokens(ops.convert_to_tensor(b)) for b in batches]
    is_train = np.arange(len(token_ids)) < split
    train_rows = np.repeat(is_train, token_ids.shape[1])
    reports = []
    keras.utils.set_random_seed(seed)
    for index, block in enumerate(model.blocks, start=1):
        router = block.block.ffn
        features, targets, next_hidden = [], [], []
        for h in hidden:
            wants_input = isinstance(router, SkipRouter)
            outputs = block(h, routing="all", return_ffn_input=wants_input)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            next_hidden.append(outputs[0])
            if wants_input:
                normed = outputs[-1]
                delta = router.layer(normed)
                features.append(np.asarray(normed, "float32").reshape(-1, normed.shape[-1]))
                targets.append(relative_ffn_change(outputs[0] - delta, delta))
        hidden = next_hidden
        if not isinstance(router, SkipRouter):
            continue
        report = _fit_one(
            router,
            np.concatenate(features),
            np.concatenate(targets),
            train_rows,
            epochs,
            learning_rate,
            fit_batch_size,
            seed + index,
        )
        report["layer"] = index
        reports.append(report)
        if log:
            log(
                f"layer {index:>2}: change {report['target_mean']:+.2f} +/- "
                f"{report['target_std']:.2f}, held-out r {report['held_out_correlation']:.3f}, "
                f"top-half recall {report['top_half_recall']:.3f}"
            )
    return reports


def _fit_one(router, features, targets, train_rows, epochs, learning_rate, batch, seed):
    # The predictor's two Dense layers, fitted in place; the rest of the router is not
    # touched, and the trainable flags are restored.
    layers = (router.predictor_hidden, router.predictor_output)
    flags = [layer.trainable for layer in layers]
    for layer in layers:
        layer.trainable = True
    inputs = keras.Input((features.shape[-1],), dtype=router.predictor_hidden.compute_dtype)
    outputs = router.predictor_output(router.predictor_hidden(inputs))
    head = keras.Model(inputs, outputs)
    head.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="mse")
    order = np.random.default_rng(seed).permutation(int(train_rows.sum()))
    x_train, y_train = features[train_rows][order], targets[train_rows][order]
    # Fitted on the standardized target, then the output layer is rescaled so that the
    # predictor says the change itself: one scale for every layer.
    mean, std = float(y_train.mean()), float(max(y_train.std(), 1e-6))
    head.fit(x_train, (y_train[:, None] - mean) / std, batch_size=batch, epochs=epochs, verbose=0)
    kernel, bias = router.predictor_output.get_weights()
    router.predictor_output.set_weights([kernel * std, bias * std + mean])
    x_test, y_test = features[~train_rows], targets[~train_rows]
    predicted = np.asarray(head.predict(x_test, batch_size=4 * batch, verbose=0), "float64")[:, 0]
    for layer, flag in zip(layers, flags, strict=True):
        layer.trainable = flag
    correlation = float(np.corrcoef(predicted, y_test)[0, 1]) if y_test.std() > 0 else 0.0
    top_actual = y_test > np.median(y_test)
    top_predicted = predicted > np.median(predicted)
    recall = float((top_actual & top_predicted).sum() / max(top_actual.sum(), 1))
    return {
        "target_mean": float(targets.mean()),
        "target_std": float(targets.std()),
        "held_out_mse": float(np.mean((predicted - y_test) ** 2)),
        "held_out_correlation": correlation,
        "top_half_recall": recall,
    }
