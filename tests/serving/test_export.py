"""SavedModel export: the in-graph decode loop equals in-Python generation, in this process
and in a fresh one without toex_tf; no XLA ops; bad input fails with a named error."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from depth_dependent import make_depth_dependent
from serving_helpers import WITHOUT_TOEX_TF, fresh_process, right_padded

from toex_tf.export import (
    EXPORT_MODES,
    SIGNATURES,
    export_saved_model,
    generate_with_export,
    score_with_export,
    xla_ops,
)
from toex_tf.inference import DecoderAdapter, ExitPolicy, generate, pad_prompts
from toex_tf.inference.teacher_forced import exit_logits
from toex_tf.models import build_gpt, build_llama

PROMPTS = [[5, 9, 2, 7, 11], [3, 8], [12, 4, 6]]
# Windows long enough for the score signature's exits to vary (12, 9 and 10 tokens).
SCORE_ROWS = [prompt + np.random.default_rng(7).integers(0, 64, 7).tolist() for prompt in PROMPTS]
# A max_prob threshold at which `_gpt()`'s tokens leave at different exits (checked below).
MIXED = 0.1
THRESHOLDS = (0.0, MIXED, 1.0)
NUM_LAYERS = 4


def _gpt():
    """A seeded tiny GPT whose layers each move the residual stream (residual-branch
    output kernels redrawn with std 1/sqrt(fan_in)) and whose embeddings are scaled 4x:
    confidences vary by token and layer, so at `MIXED` tokens leave at different exits and
    early exits change the text (a peaky model's exits all predict the input token)."""
    keras.utils.set_random_seed(1)
    model = build_gpt("tiny", num_layers=NUM_LAYERS, exit_layers="all", max_length=32)
    make_depth_dependent(model, embedding_scale=4.0)
    return model


def _assert_exit_layers(exits, mode, threshold):
    """Exit layers after the prefill's column: full depth or threshold 1.0 never exit,
    threshold 0.0 always leaves at layer 1, and at `MIXED` the layers vary."""
    layers = set(np.unique(exits[exits > 0]).tolist())
    where = f"{mode} {threshold}: exit layers {sorted(layers)}"
    if mode == "full" or threshold == 1.0:
        assert layers == {NUM_LAYERS}, where
    elif threshold == 0.0:
        assert layers == {1}, where
    else:
        assert len(layers) >= 2, where


@pytest.fixture(scope="module")
def gpt_export(tmp_path_factory):
    model = _gpt()  # seeded: module fixtures run before the per-test seed
    directory = str(tmp_path_factory.mktemp("gpt_export"))
    export_saved_model(model, directory)
    return model, directory, tf.saved_model.load(directory)


def _python_generate(model, prompt, new_tokens, mode, threshold, **kwargs):
    adapter = DecoderAdapter(model, **kwargs)
    tokens, exits = generate(
        adapter, np.array([prompt], "int32"), new_tokens, ExitPolicy(mode, "max_prob", threshold)
    )
    return np.asarray(tokens)[0], np.asarray(exits)[0]


def test_export_generates_what_python_generates(gpt_export):
    model, _, loaded = gpt_export
    ids, lengths = right_padded(PROMPTS)
    adapter = DecoderAdapter(model)
    prompt, mask = pad_prompts(PROMPTS)  # a padded batch generates what each row does alone
    full_tokens, _ = generate_with_export(loaded, ids, lengths, 10, 0.0, "full")
    for mode in EXPORT_MODES:
        for threshold in THRESHOLDS:
            tokens, exits = generate_with_export(loaded, ids, lengths, 10, threshold, mode)
            assert tokens.shape == exits.shape == (len(PROMPTS), 10)
            policy = ExitPolicy(mode, "max_prob", threshold)
            want_tokens, want_exits, state = generate(
                adapter, prompt, 10, policy, padding_mask=mask, return_state=True
            )
            np.testing.assert_array_equal(tokens, want_tokens, err_msg=f"{mode} {threshold}")
            np.testing.assert_array_equal(exits, want_exits, err_msg=f"{mode} {threshold}")
            _assert_exit_layers(exits[:, 1:], mode, threshold)
            if mode != "full" and threshold == MIXED:
                # Early exits changed the text, so a mode that quietly ran full depth
                # would not match; frozen and lazy skipped layers on this run.
                assert (tokens != full_tokens).any(), mode
                if mode in ("frozen", "lazy"):
                    layers_run, steps = int(state["layers_run"]), int(state["steps"])
                    assert layers_run < NUM_LAYERS * steps, mode


def test_export_has_no_xla_ops_and_named_signatures(gpt_export):
    _, directory, loaded = gpt_export
    assert xla_ops(directory) == []
    assert set(loaded.signatures) == set(SIGNATURES)
    assert set(SIGNATURES) == {"generate", "score", "logits", "serving_default"}
    inputs = loaded.signatures["generate"].structured_input_signature[1]
    assert set(inputs) == {"token_ids", "lengths", "max_new_tokens", "threshold", "mode"}
    inputs = loaded.signatures["serving_default"].structured_input_signature[1]
    assert set(inputs) == {"token_ids", "lengths", "max_new_tokens", "threshold", "mode"}
    inputs = loaded.signatures["score"].structured_input_signature[1]
    assert set(inputs) == {"token_ids", "lengths", "threshold", "mode"}


def test_score_equals_python_exit_logits_row_by_row(gpt_export):
    model, _, loaded = gpt_export
    ids, lengths = right_padded(SCORE_ROWS)
    adapter = DecoderAdapter(model)
    scored = {}
    for mode in EXPORT_MODES:
        for threshold in THRESHOLDS:
            logits, exits = score_with_export(loaded, ids, lengths, threshold, mode)
            assert logits.shape == (len(SCORE_ROWS), ids.shape[1], 64)
            policy = ExitPolicy(mode, "max_prob", threshold)
            # The batch as Python scores it: padding ids are 0, and frozen mode skips a
            # layer only when every row exited, so its rows depend on the batch.
            batch, batch_exits = exit_logits(adapter, policy, ids)
            for row, prompt in enumerate(SCORE_ROWS):
                n = len(prompt)
                np.testing.assert_allclose(logits[row, :n], batch[row, :n], atol=1e-5, rtol=0)
                np.testing.assert_array_equal(exits[row, :n], batch_exits[row, :n])
                assert (logits[row, n:] == 0).all() and (exits[row, n:] == 0).all()
                if mode == "frozen" or threshold != MIXED:
                    continue
                # Exact modes: padding never reaches real positions, so each row alone
                # scores the same.
                want, want_exits = exit_logits(adapter, policy, np.array([prompt], "int32"))
                np.testing.assert_allclose(logits[row, :n], want[0], atol=1e-5, rtol=0)
                np.testing.assert_array_equal(exits[row, :n], want_exits[0])
            _assert_exit_layers(exits[:, 1:], mode, threshold)
            scored[mode, threshold] = logits
    # The modes are told apart: with exits, early predictions are not the final layer's,
    # and frozen's propagated K/V (not exact) move its logits away from unfrozen's.
    for mode in ("unfrozen", "frozen", "lazy"):
        assert np.abs(scored[mode, MIXED] - scored["full", MIXED]).max() > 1e-3, mode
    assert np.abs(scored["frozen", MIXED] - scored["unfrozen", MIXED]).max() > 1e-3
    np.testing.assert_allclose(scored["lazy", MIXED], scored["unfrozen", MIXED], atol=1e-5)


def test_logits_signature_and_reusable_call_equal_the_model(gpt_export):
    model, _, loaded = gpt_export
    ids = np.array([[5, 9, 2, 7], [3, 8, 1, 1]], "int32")
    want = np.asarray(model(ids)["exit_logits"][-1])
    out = loaded.signatures["logits"](token_ids=tf.constant(ids))
    np.testing.assert_allclose(np.asarray(next(iter(out.values()))), want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(loaded(tf.constant(ids))), want, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(loaded(tf.constant(ids), training=True)), want, atol=1e-5
    )  # the tiny preset has no dropout: training=True is the same function here
    with pytest.raises(tf.errors.InvalidArgumentError, match="vocabulary"):
        loaded(tf.constant([[5, 640]]))


def test_reusable_saved_model_attributes(gpt_export):
    model, _, loaded = gpt_export
    assert len(loaded.variables) == len(model.variables)
    assert len(loaded.trainable_variables) == len(model.trainable_variables)
    assert {v.shape for v in loaded.trainable_variables} == {
        tuple(v.shape) for v in model.trainable_variables
    }
    assert list(loaded.regularization_losses) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(threshold=1.5), r"threshold must be in \[0, 1\]"),
        (dict(mode="fast"), "unknown mode"),
        (dict(token_ids=[[5, 999]], lengths=[2]), r"token ids must be in \[0, 64\)"),
        (dict(token_ids=np.zeros((1, 40), "int32"), lengths=[40]), "wider than max_length=32"),
        (dict(token_ids=[[5, 6]], lengths=[3]), "must not exceed the width"),
    ],
)
def test_bad_input_to_score(gpt_export, change, message):
    _, _, loaded = gpt_export
    args = dict(token_ids=[[5, 6, 7]], lengths=[3], threshold=0.5, mode="frozen")
    args.update(change)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        score_with_export(loaded, **args)


HUB_PROCESS = """
import json, sys
sys.modules["toex_tf"] = None  # toex_tf must not be importable here
import numpy as np
import tensorflow as tf
import tensorflow_hub as hub
loaded = hub.load(sys.argv[1])
for name in ("variables", "trainable_variables", "regularization_losses"):
    assert isinstance(list(getattr(loaded, name)), list), name
assert callable(loaded)
ids = tf.constant(json.loads(sys.argv[2]), tf.int32)
logits = loaded(ids, training=False)
print("RESULT", json.dumps({
    "logits": np.asarray(logits).tolist(),
    "variables": len(loaded.variables),
    "trainable": len(loaded.trainable_variables),
    "regularization_losses": len(loaded.regularization_losses),
}))
"""


def test_hub_load_in_a_fresh_process(gpt_export, tmp_path):
    model, directory, _ = gpt_export
    ids = [[5, 9, 2], [7, 3, 1]]
    out = fresh_process(HUB_PROCESS, tmp_path, directory, json.dumps(ids))
    want = np.asarray(model(np.array(ids, "int32"))["exit_logits"][-1])
    np.testing.assert_allclose(np.array(out["logits"]), want, atol=1e-5)
    assert out["variables"] == len(model.variables)
    assert out["trainable"] == len(model.trainable_variables)
    assert out["regularization_losses"] == 0


def test_tfsm_layer_in_a_keras_3_model(gpt_export):
    import keras  # noqa: PLC0415

    model, directory, _ = gpt_export
    token_ids = keras.Input((None,), dtype="int32")
    logits = keras.layers.TFSMLayer(directory, call_endpoint="logits")(token_ids)
    probabilities = keras.layers.Softmax()(logits)
    wrapped = keras.Model(token_ids, probabilities)
    ids = np.array([[5, 9, 2, 7]], "int32")
    want = keras.ops.softmax(model(ids)["exit_logits"][-1], axis=-1)
    np.testing.assert_allclose(np.asarray(wrapped(ids)), np.asarray(want), atol=1e-5)


FRESH_PROCESS = (
    WITHOUT_TOEX_TF
    + """
loaded = tf.saved_model.load(sys.argv[1])
out = loaded.signatures["generate"](
    token_ids=tf.constant(json.loads(sys.argv[2]), tf.int32),
    lengths=tf.constant(json.loads(sys.argv[3]), tf.int32),
    max_new_tokens=tf.constant(8), threshold=tf.constant(float(sys.argv[4])),
    mode=tf.constant("lazy"))
result = [out["token_ids"].numpy().tolist(), out["exit_layers"].numpy().tolist()]
print("RESULT", json.dumps(result))
"""
)


def test_fresh_process_without_toex_tf_generates_the_same_tokens(gpt_export, tmp_path):
    model, directory, loaded = gpt_export
    ids, lengths = right_padded(PROMPTS)
    result = fresh_process(
        FRESH_PROCESS,
        tmp_path,
        directory,
        json.dumps(ids.tolist()),
        json.dumps(lengths.tolist()),
        str(MIXED),
    )
    tokens, exits = (np.array(a) for a in result)
    want_tokens, want_exits = generate_with_export(loaded, ids, lengths, 8, MIXED, "lazy")
    np.testing.assert_array_equal(tokens, want_tokens)
    np.testing.assert_array_equal(exits, want_exits)
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(
            tokens[row], _python_generate(model, prompt, 8, "lazy", MIXED)[0]
        )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be > 0"),
        (dict(max_new_tokens=40), "exceeds max_length=32"),
        (dict(threshold=1.5), r"threshold must be in \[0, 1\]"),
        (dict(threshold=-0.1), r"threshold must be in \[0, 1\]"),
        (dict(mode="fast"), "unknown mode"),
        (dict(token_ids=[[5, 999]], lengths=[2]), r"token ids must be in \[0, 64\)"),
        (dict(token_ids=[[5, 6]], lengths=[0]), "at least one token"),
        (dict(token_ids=[[5, 6]], lengths=[3]), "must not exceed the width"),
        (dict(token_ids=[[5, 6]], lengths=[2, 2]), "one entry per prompt row"),
        (dict(token_ids=np.zeros((1, 0), "int32"), lengths=[1]), "token_ids is empty"),
    ],
)
def test_bad_input_at_the_serving_boundary(gpt_export, change, message):
    _, _, loaded = gpt_export
    args = dict(token_ids=[[5, 6, 7]], lengths=[3], max_new_tokens=4, threshold=0.5, mode="frozen")
    args.update(change)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        generate_with_export(loaded, **args)


def test_out_of_vocabulary_padding_is_ignored(gpt_export):
    _, _, loaded = gpt_export
    a = generate_with_export(loaded, [[5, 6, 999]], [2], 4, 0.5, "frozen")
    b = generate_with_export(loaded, [[5, 6, 0]], [2], 4, 0.5, "frozen")
    np.testing.assert_array_equal(a[0], b[0])


def test_wrong_dtype_is_refused(gpt_export):
    _, _, loaded = gpt_export
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        loaded.signatures["generate"](
            token_ids=tf.constant([[5, 6]], tf.int64),
            lengths=tf.constant([2]),
            max_new_tokens=tf.constant(2),
            threshold=tf.constant(0.5),
            mode=tf.constant("full"),
        )


def test_llama_with_exits_and_routers_exports(tmp_path):
    keras.utils.set_random_seed(1)
    model = build_llama("llama-tiny", num_layers=3, exit_layers=(1, 2), capacity=0.55)
    for router in model.routers:  # route about half the tokens at decode time
        router.predictor_threshold.assign(0.0)
    rng = np.random.default_rng(2)
    for gate in model.gates:  # untrained gates say 0.5 everywhere: give them opinions
        for weight in gate.weights:
            weight.assign(rng.normal(0.0, 1.0, weight.shape).astype("float32"))
    directory = export_saved_model(model, str(tmp_path / "llama"), criterion="learned")
    assert xla_ops(directory) == []
    loaded = tf.saved_model.load(directory)
    ids, lengths = right_padded(PROMPTS)
    score_ids, score_lengths = right_padded(SCORE_ROWS)
    adapter = DecoderAdapter(model)
    prompt, mask = pad_prompts(PROMPTS)
    settings = (
        ("full", 0.5),
        ("unfrozen", 0.5),
        ("frozen", 0.5),
        ("lazy", 0.0),
        ("lazy", 0.5),
    )
    for mode, threshold in settings:
        tokens, exits = generate_with_export(loaded, ids, lengths, 6, threshold, mode)
        policy = ExitPolicy(mode, "learned", threshold)
        want, want_exits = generate(adapter, prompt, 6, policy, padding_mask=mask)
        np.testing.assert_array_equal(tokens, want, err_msg=mode)
        np.testing.assert_array_equal(exits, want_exits, err_msg=mode)
        # Threshold 0.0: every token after the prefill's leaves at layer 1; 0.5: the
        # gates disagree by token, so the exit layers vary.
        layers = set(np.unique(exits[:, 1:]).tolist())
        where = f"{mode} {threshold}: exit layers {sorted(layers)}"
        if mode == "full" or threshold == 1.0:
            assert layers == {3}, where
        elif threshold == 0.0:
            assert layers == {1}, where
        else:
            assert len(layers) >= 2, where
        logits, exits = score_with_export(loaded, score_ids, score_lengths, threshold, mode)
        batch, batch_exits = exit_logits(adapter, policy, score_ids)
        for row, row_ids in enumerate(SCORE_ROWS):
            n = len(row_ids)
            np.testing.assert_allclose(logits[row, :n], batch[row, :n], atol=1e-5, rtol=0)
            np.testing.assert_array_equal(exits[row, :n], batch_exits[row, :n])
            if (mode, threshold) in (("unfrozen", 0.5), ("lazy", 0.5)):  # each row alone too
                want, want_exits = exit_logits(adapter, policy, np.array([row_ids], "int32"))
                np.testing.assert_allclose(logits[row, :n], want[0], atol=1e-5, rtol=0)
                np.testing.assert_array_equal(exits[row, :n], want_exits[0])
        if mode != "full" and 0.0 < threshold < 1.0:
            assert len(np.unique(exits[:, 1:][exits[:, 1:] > 0])) >= 2, (mode, threshold)
    want = np.asarray(model(ids)["logits"])
    np.testing.assert_allclose(np.asarray(loaded(tf.constant(ids))), want, atol=1e-5)
