"""The encoder-decoder Transformer: its graph, and decoding it with every exit mode."""

import dataclasses
import os

import keras
import numpy as np
import pytest
from depth_dependent import make_depth_dependent

from toex_tf.config import TransformerConfig
from toex_tf.inference import DecoderAdapter, ExitPolicy, flush_lazy, prefill
from toex_tf.inference.step import decode_step
from toex_tf.inference.translate import pad_sources, translate
from toex_tf.models import EarlyExitTransformer, build_transformer

RNG = np.random.default_rng(0)
SOURCES = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
TARGET = RNG.integers(2, 64, size=(2, 12)).astype("int32")


def _model(**kwargs):
    keras.utils.set_random_seed(1)
    return build_transformer("tiny", **{"num_layers": 4, "max_length": 40, **kwargs})


def _inputs(model, target=TARGET):
    ids, mask = pad_sources(SOURCES)
    return {"encoder_token_ids": ids, "encoder_padding_mask": mask, "decoder_token_ids": target}


def _depth_dependent_model():
    """Residual-branch output kernels redrawn with std 1/sqrt(fan_in) and sharper
    embeddings: exits disagree with each other and confidences vary by token, so exit
    modes take different paths (a random tiny model's exits nearly always agree)."""
    model = _model()
    make_depth_dependent(model, embedding_scale=8.0)
    return model


def _context_adapter(model):
    ids, mask = pad_sources(SOURCES)
    return DecoderAdapter(model).with_context(model.decoder_context(ids, mask))


def test_round_trip_and_outputs(tmp_path):
    model = _model(exit_layers="2,4")
    outputs = model(_inputs(model))
    assert len(outputs["exit_logits"]) == 2 and outputs["logits"].shape == (2, 12, 64)
    assert model.exit_layers == (2, 4) and model.num_layers == 4
    path = os.path.join(tmp_path, "seq2seq.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, EarlyExitTransformer) and loaded.config == model.config
    for a, b in zip(outputs["exit_logits"], loaded(_inputs(model))["exit_logits"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_untied_embeddings_are_a_separate_matrix():
    model = _model(tie_embeddings=False)
    input_embedding = model.get_layer("input_embedding").embeddings
    assert input_embedding.shape == model.token_embedding.embeddings.shape
    before = np.asarray(model(_inputs(model))["logits"])
    input_embedding.assign(np.zeros(input_embedding.shape, "float32"))
    after = np.asarray(model(_inputs(model))["logits"])
    assert np.abs(after - before).max() > 1e-3  # the inputs read the other matrix


def test_source_padding_changes_nothing():
    model = _model()
    ids, mask = pad_sources(SOURCES, length=12)
    padded = model({**_inputs(model), "encoder_token_ids": ids, "encoder_padding_mask": mask})
    alone = model(
        {
            "encoder_token_ids": np.asarray([SOURCES[1]], "int32"),
            "encoder_padding_mask": np.ones((1, 3), "int32"),
            "decoder_token_ids": TARGET[1:],
        }
    )
    np.testing.assert_allclose(
        np.asarray(padded["logits"])[1:], np.asarray(alone["logits"]), atol=1e-5
    )


def test_cached_decoding_equals_an_uncached_forward_pass():
    model = _depth_dependent_model()
    full = [np.asarray(x) for x in model(_inputs(model))["exit_logits"]]
    adapter = _context_adapter(model)
    logits, caches = prefill(adapter, TARGET[:, :3], adapter.empty_caches(2))
    steps = [np.asarray(logits)]
    for mode in ("full", "unfrozen"):
        policy = ExitPolicy(mode, "max_prob", 1.0)  # never exits
        for t in range(3, 11):
            logits, exit_layer, caches, _, _ = decode_step(
                adapter, policy, TARGET[:, t : t + 1], t, caches
            )
            if mode == "full":
                steps.append(np.asarray(logits))
            assert (np.asarray(exit_layer) == 4).all()
        if mode == "full":
            np.testing.assert_allclose(np.stack(steps, 1), full[-1][:, 2:11], atol=1e-5)
            _, caches = prefill(adapter, TARGET[:, :3], adapter.empty_caches(2))
    # An exit that always passes predicts from layer 1: the uncached layer-1 logits.
    _, caches = prefill(adapter, TARGET[:, :3], adapter.empty_caches(2))
    logits, exit_layer, _, _, _ = decode_step(
        adapter, ExitPolicy("unfrozen", "max_prob", 0.0), TARGET[:, 3:4], 3, caches
    )
    assert (np.asarray(exit_layer) == 1).all()
    np.testing.assert_allclose(np.asarray(logits), full[0][:, 3], atol=1e-5)


def _translate(model, policy=None, **options):
    ids, mask = pad_sources(SOURCES)
    return translate(DecoderAdapter(model), ids, mask, 16, start_id=1, policy=policy, **options)


def test_never_exit_equals_full_depth_in_every_mode():
    model = _depth_dependent_model()
    reference = [np.asarray(x) for x in _translate(model)]
    for mode in ("frozen", "lazy"):  # unfrozen: test_lazy_equals_unfrozen_...
        got = _translate(model, ExitPolicy(mode, "max_prob", 1.0))
        for a, b in zip(reference, got):
            np.testing.assert_array_equal(np.asarray(b), a)


# Under this policy and sampling seed the depth-dependent model's exits vary and lazy
# mode defers layers, some still pending at the end (the tests assert all three).
LAZY, SEED = ExitPolicy("lazy", "max_prob", 0.15, max_pending=4), 1


def test_lazy_equals_unfrozen_and_its_caches_equal_a_full_pass():
    model = _depth_dependent_model()
    policy, seed = LAZY, SEED
    tokens, exits, state = _translate(
        model, policy, sampling="sample", seed=seed, return_state=True
    )
    next_position = int(state["next_position"])
    assert len(np.unique(np.asarray(exits))) >= 3  # exits vary
    assert int(state["layers_run"]) < 4 * int(state["steps"])  # layers were deferred
    assert (np.asarray(state["lazy"][1]) < next_position).any()  # and some still are
    unfrozen = _translate(
        model, dataclasses.replace(policy, mode="unfrozen"), sampling="sample", seed=seed
    )
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(unfrozen[0]))
    np.testing.assert_array_equal(np.asarray(exits), np.asarray(unfrozen[1]))
    adapter = _context_adapter(model)
    caches, lazy = flush_lazy(adapter, policy, state["caches"], state["lazy"], next_position)
    sequence = np.concatenate([np.ones((2, 1), "int32"), np.asarray(tokens)], axis=1)
    _, exact = prefill(adapter, sequence[:, :next_position], adapter.empty_caches(2))
    for layer, cache in enumerate(caches):
        np.testing.assert_allclose(
            np.asarray(cache)[:, :, :, :next_position],
            np.asarray(exact[layer])[:, :, :, :next_position],
            atol=1e-5,
        )


def test_frozen_mode_exits_and_skips_layers():
    model = _depth_dependent_model()
    _, exits, state = _translate(
        model, dataclasses.replace(LAZY, mode="frozen"), return_state=True, seed=SEED
    )
    assert int(state["layers_run"]) < 4 * int(state["steps"])
    assert 0 < (np.asarray(exits) < 4).sum()


def test_speculative_equals_full_greedy_and_stops_like_it(draft_layer=2, draft_length=3):
    model = _depth_dependent_model()
    reference = [np.asarray(x) for x in _translate(model)]
    tokens, exits, state = _translate(
        model, draft_layer=draft_layer, draft_length=draft_length, return_state=True
    )
    np.testing.assert_array_equal(np.asarray(tokens), reference[0])
    assert int(state["accepted"]) > 0
    # With a stop token, both stop at the same place and fill the rest the same way.
    stop = int(reference[0][0, 5])
    full = _translate(model, stop_token_ids=(stop,))
    drafted = _translate(
        model, draft_layer=draft_layer, draft_length=draft_length, stop_token_ids=(stop,)
    )
    np.testing.assert_array_equal(np.asarray(drafted[0]), np.asarray(full[0]))
    assert ((np.asarray(drafted[1]) == 0) == (np.asarray(full[1]) == 0)).all()


@pytest.mark.parametrize(
    "sources, mask, error",
    [
        (np.zeros((1, 0), "int32"), np.zeros((1, 0), "int32"), "source_ids is empty"),
        (np.ones((1, 17), "int32"), np.ones((1, 17), "int32"), "max_source_length=16"),
        (np.ones((1, 4), "int32"), np.ones((1, 5), "int32"), "source_padding_mask must"),
        (np.full((1, 4), 64, "int32"), np.ones((1, 4), "int32"), r"\[0, 64\)"),
        (np.ones((2, 4), "int32"), np.array([[1] * 4, [0] * 4]), "source rows \\[1\\]"),
        (np.ones((4,), "int32"), np.ones((4,), "int32"), "batch, source_length"),
    ],
)
def test_bad_sources_are_named(sources, mask, error):
    with pytest.raises(ValueError, match=error):
        translate(DecoderAdapter(_model()), sources, mask, 4, start_id=1)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sources \\[1\\] are empty"):
        pad_sources([[3], []])
    with pytest.raises(ValueError, match="length=2"):
        pad_sources([[3, 4, 5]], length=2)
    ids, mask = pad_sources([[3, 4]])
    with pytest.raises(ValueError, match="start_id"):
        translate(DecoderAdapter(_model()), ids, mask, 4, start_id=99)
    with pytest.raises(ValueError, match="max_length=40"):
        translate(DecoderAdapter(_model()), ids, mask, 40, start_id=1)
    with pytest.raises(ValueError, match="num_encoder_layers"):
        TransformerConfig(num_encoder_layers=0)
    with pytest.raises(ValueError, match="unknown seq2seq preset"):
        build_transformer("huge")
