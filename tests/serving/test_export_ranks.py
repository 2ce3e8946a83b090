"""Every exported signature checks each input's rank first, and names the input.

Called with a wrong-rank input, a SavedModel signature skips its `tf.TensorSpec` shape check
(TF falls back to the flat call); without the checks the call failed deep inside, as "slice
index 0 of dimension 0 out of bounds". One tiny export (byte tokenizer, so `generate_text`
is there too) serves every case; each bad call fails before the decode loop runs.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from toex_tf.data.tokenizers import ByteTokenizer
from toex_tf.export import TEXT_SIGNATURE, export_saved_model
from toex_tf.models import build_gpt

# Valid inputs of each signature, by name.
GOOD = {
    "generate": dict(
        token_ids=[[5, 6, 7]], lengths=[3], max_new_tokens=2, threshold=0.5, mode="frozen"
    ),
    "score": dict(token_ids=[[5, 6, 7]], lengths=[3], threshold=0.5, mode="frozen"),
    "logits": dict(token_ids=[[5, 6, 7]]),
    TEXT_SIGNATURE: dict(prompt=["Return the"], max_new_tokens=2, threshold=0.5, mode="frozen"),
}
GOOD["serving_default"] = GOOD["generate"]
RANK_NAMES = {0: "a scalar", 1: "a vector", 2: "a matrix"}
DTYPES = {"threshold": tf.float32, "prompt": tf.string, "mode": tf.string}


def _tensors(inputs):
    return {name: tf.constant(value, DTYPES.get(name, tf.int32)) for name, value in inputs.items()}


def _wrong_ranks(value):
    """The same value one rank up and, for a vector or a matrix, one rank down."""
    array = np.asarray(value)
    yield array[None]
    if array.ndim > 0:
        yield array[0]


CASES = [
    (signature, name, wrong)
    for signature, inputs in GOOD.items()
    for name, value in inputs.items()
    for wrong in _wrong_ranks(value)
]


def _case_id(case):
    signature, name, wrong = case
    return f"{signature}-{name}-rank{np.ndim(wrong)}"


@pytest.fixture(autouse=True)
def _seed():
    """Replaces the conftest's reseed before each test: `tf.random.set_seed` clears TF's
    kernel cache, and a signature's first call (its decode loop's kernels) takes seconds."""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    keras.utils.set_random_seed(0)
    tokenizer = ByteTokenizer()
    model = build_gpt(
        "tiny", num_layers=2, exit_layers="all", max_length=16, vocab_size=tokenizer.vocab_size
    )
    directory = str(tmp_path_factory.mktemp("rank_export"))
    export_saved_model(model, directory, tokenizer=tokenizer)
    return tf.saved_model.load(directory)


def test_every_signature_is_covered(loaded):
    assert set(loaded.signatures) == set(GOOD)
    for signature, inputs in GOOD.items():
        assert set(loaded.signatures[signature].structured_input_signature[1]) == set(inputs)


@pytest.mark.parametrize("signature", sorted(GOOD))
def test_valid_ranks_pass_the_checks(loaded, signature):
    outputs = loaded.signatures[signature](**_tensors(GOOD[signature]))
    assert outputs


@pytest.mark.parametrize("case", CASES, ids=[_case_id(case) for case in CASES])
def test_a_wrong_rank_is_named_by_every_signature(loaded, case):
    signature, name, wrong = case
    want = len(loaded.signatures[signature].structured_input_signature[1][name].shape)
    inputs = {**GOOD[signature], name: wrong}
    message = rf"{name} must be {RANK_NAMES[want]} \(rank {want}\), got rank {np.ndim(wrong)}"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        loaded.signatures[signature](**_tensors(inputs))


@pytest.mark.parametrize("signature", ["generate", "score", "logits", TEXT_SIGNATURE])
def test_restored_endpoints_name_a_wrong_rank(loaded, signature):
    # The root's endpoint attributes fall back to the flat call too: the same checks.
    inputs = GOOD[signature]
    name = next(iter(inputs))
    wrong = next(_wrong_ranks(inputs[name]))
    with pytest.raises(tf.errors.InvalidArgumentError, match=rf"{name} must be .*, got rank"):
        getattr(loaded, signature)(**_tensors({**inputs, name: wrong}))


def test_reusable_call_refuses_a_wrong_rank_by_name(loaded):
    # TF-Hub's `__call__` matches its input against its traces before running anything.
    with pytest.raises(ValueError, match=r"(?s)shape=\(3,\).*name='token_ids'"):
        loaded(tf.constant([5, 6, 7]))
