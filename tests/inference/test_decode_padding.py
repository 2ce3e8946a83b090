"""Batches of prompts with different lengths: left padding with a mask equals row-by-row runs."""

import numpy as np
import pytest

from toex_tf.inference import (
    DecoderAdapter,
    ExitPolicy,
    generate,
    generate_speculative,
    pad_prompts,
    padding_state,
    prefill,
)
from toex_tf.models import build_gpt

RNG = np.random.default_rng(3)
PROMPTS = [RNG.integers(1, 64, size=n).tolist() for n in (2, 6, 4)]


def _adapter(peaky=True):
    model = build_gpt("tiny", num_layers=4, exit_layers="all", max_length=48)
    if peaky:
        embeddings = model.token_embedding.embeddings
        embeddings.assign(np.asarray(embeddings) * 30.0)
    return DecoderAdapter(model)


def test_pad_prompts_left_pads():
    prompt, mask = pad_prompts([[5, 6], [7, 8, 9]], pad_id=0)
    np.testing.assert_array_equal(prompt, [[0, 5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="empty"):
        pad_prompts([[1], []])


def test_padded_prefill_logits_equal_each_row_alone():
    adapter = _adapter(peaky=False)
    prompt, mask = pad_prompts(PROMPTS)
    padding = padding_state(mask, adapter.max_length)
    batched, _ = prefill(adapter, prompt, adapter.empty_caches(3), padding)
    for row, ids in enumerate(PROMPTS):
        alone, _ = prefill(adapter, np.array([ids], "int32"), adapter.empty_caches(1))
        np.testing.assert_allclose(np.asarray(batched)[row], np.asarray(alone)[0], atol=1e-5)


@pytest.mark.parametrize(
    "policy",
    [
        ExitPolicy("full"),
        ExitPolicy("unfrozen", "max_prob", 0.6),
        ExitPolicy("lazy", "max_prob", 0.6, max_pending=3),
        ExitPolicy("frozen", "max_prob", 0.0),  # every row leaves at layer 1: no batch effect
        ExitPolicy("unfrozen", "saturation", 0.9, threshold_decay=2.0),
    ],
    ids=lambda p: f"{p.mode}-{p.criterion}",
)
def test_padded_batch_generates_what_each_row_generates_alone(policy):
    adapter = _adapter()
    prompt, mask = pad_prompts(PROMPTS)
    tokens, exits, state = generate(
        adapter, prompt, 12, policy, padding_mask=mask, return_state=True
    )
    early = 0
    for row, ids in enumerate(PROMPTS):
        alone_tokens, alone_exits, alone = generate(
            adapter, np.array([ids], "int32"), 12, policy, return_state=True
        )
        np.testing.assert_array_equal(np.asarray(tokens)[row], np.asarray(alone_tokens)[0])
        np.testing.assert_array_equal(np.asarray(exits)[row], np.asarray(alone_exits)[0])
        early += int((np.asarray(alone_exits) < 4).sum())
        # The row's K/V (shifted past its padding) equal the solo run's at every layer,
        # wherever the solo run filled them: the mask and positions are right, not just
        # the argmax (tokens of a random tiny model barely depend on attention).
        pad = prompt.shape[1] - len(ids)
        steps = int(alone["next_position"])
        filled = np.asarray(alone["lazy"][1]) if policy.mode == "lazy" else [steps] * 4
        for layer in range(4):
            upto = int(filled[layer])
            np.testing.assert_allclose(
                np.asarray(state["caches"][layer])[row, :, :, pad : pad + upto],
                np.asarray(alone["caches"][layer])[0, :, :, :upto],
                atol=1e-5,
            )
    if policy.mode != "full":
        assert early > 0  # exits happened, so the comparison covers them


def test_padded_speculative_equals_full_greedy():
    adapter = _adapter()
    prompt, mask = pad_prompts(PROMPTS)
    tokens, _ = generate_speculative(adapter, prompt, 16, draft_layer=2, padding_mask=mask)
    for row, ids in enumerate(PROMPTS):
        alone, _ = generate(adapter, np.array([ids], "int32"), 16)
        np.testing.assert_array_equal(np.asarray(tokens)[row], np.asarray(alone)[0])


def test_padding_mask_without_padding_changes_nothing():
    adapter = _adapter()
    prompt = np.array([PROMPTS[1], PROMPTS[1][::-1]], "int32")
    policy = ExitPolicy("lazy", "max_prob", 0.6, max_pending=4)
    reference = generate(adapter, prompt, 10, policy)
    masked = generate(adapter, prompt, 10, policy, padding_mask=np.ones_like(prompt))
    for a, b in zip(reference, masked):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "prompt, mask, error",
    [
        ([[1, 2], [3, 4, 5]], None, "different lengths"),
        (np.ones((2, 3), "int32"), np.ones((2, 4), "int32"), "shape"),
        (np.ones((1, 3), "int32"), np.array([[1, 1, 0]]), "last prompt token"),
        (np.ones((1, 4), "int32"), np.array([[1, 0, 1, 1]]), "between real tokens"),
        (np.array([[1, 2, 64]], "int32"), None, "vocabulary"),
        (np.array([[1, -1]], "int32"), None, "vocabulary"),
    ],
)
def test_bad_prompts_and_masks(prompt, mask, error):
    adapter = _adapter(peaky=False)
    with pytest.raises(ValueError, match=error):
        generate(adapter, prompt, 4, padding_mask=mask)


def test_float_prompt_is_a_type_error():
    with pytest.raises(TypeError, match="integer"):
        generate(_adapter(peaky=False), np.ones((1, 3), "float32"), 4)
