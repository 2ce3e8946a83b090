"""Tests for toex_tf.data.token_stream and toex_tf.data.tf_pipeline."""

import numpy as np
import pytest

from toex_tf.data.token_stream import encode_documents, lm_windows, token_frequencies
from toex_tf.data.tokenizers import ByteTokenizer

tf_pipeline = pytest.importorskip("toex_tf.data.tf_pipeline")


def batches(dataset, count):
    return [(inputs.numpy(), targets.numpy()) for inputs, targets in dataset.take(count)]


def assert_same_batches(first, second):
    assert len(first) == len(second)
    for (inputs_a, targets_a), (inputs_b, targets_b) in zip(first, second):
        np.testing.assert_array_equal(inputs_a, inputs_b)
        np.testing.assert_array_equal(targets_a, targets_b)


@pytest.fixture
def windows():
    # 26 windows of length 4 whose first input identifies the window (4 * i).
    return lm_windows(np.arange(105), 4)


# token_stream ----------------------------------------------------------------------------


def test_encode_documents_appends_eos_after_each_document():
    stream = encode_documents(["hi", "é", "a"], ByteTokenizer())
    assert stream.dtype == np.int32
    assert stream.tolist() == [104, 105, 256, 0xC3, 0xA9, 256, 97, 256]


def test_encode_documents_rejects_empty_and_bare_string():
    with pytest.raises(ValueError, match="at least one document, got 0"):
        encode_documents([], ByteTokenizer())
    with pytest.raises(TypeError, match="single str"):
        encode_documents("hi", ByteTokenizer())


def test_token_frequencies_counts_every_id():
    counts = token_frequencies(np.array([3, 0, 3, 3, 1], dtype=np.int32), 5)
    assert counts.dtype == np.int64
    assert counts.tolist() == [1, 1, 0, 3, 0]
    assert token_frequencies(np.array([], dtype=np.int32), 3).tolist() == [0, 0, 0]


def test_token_frequencies_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match=r"ids in \[0, 7\].*\[0, 5\)"):
        token_frequencies(np.array([0, 7]), 5)


def test_lm_windows_targets_are_inputs_shifted_by_one():
    stream = np.arange(100, 111)  # 11 tokens -> 3 windows of 3, one token left over.
    inputs, targets = lm_windows(stream, 3)
    assert inputs.dtype == targets.dtype == np.int32
    assert inputs.tolist() == [[100, 101, 102], [103, 104, 105], [106, 107, 108]]
    assert targets.tolist() == [[101, 102, 103], [104, 105, 106], [107, 108, 109]]
    np.testing.assert_array_equal(targets[:, :-1], inputs[:, 1:])


def test_lm_windows_exact_fit():
    inputs, targets = lm_windows(np.arange(5), 4)
    assert inputs.tolist() == [[0, 1, 2, 3]] and targets.tolist() == [[1, 2, 3, 4]]


def test_lm_windows_too_short_names_both_numbers():
    with pytest.raises(ValueError, match="has 4 tokens; expected at least seq_len \\+ 1 = 5"):
        lm_windows(np.arange(4), 4)
    with pytest.raises(ValueError, match="seq_len must be a positive int, got 0"):
        lm_windows(np.arange(10), 0)


# make_lm_dataset -------------------------------------------------------------------------


def test_dataset_batches_have_static_int32_shapes(windows):
    inputs, targets = windows
    dataset = tf_pipeline.make_lm_dataset(inputs, targets, 4, shuffle=True, seed=0, repeat=True)
    input_spec, target_spec = dataset.element_spec
    assert tuple(input_spec.shape) == tuple(target_spec.shape) == (4, 4)
    assert input_spec.dtype.name == "int32"
    for batch_inputs, batch_targets in batches(dataset, 3):
        np.testing.assert_array_equal(batch_targets[:, :-1], batch_inputs[:, 1:])


def test_dataset_is_reproducible_across_epochs_and_fresh_datasets(windows):
    inputs, targets = windows

    def make(seed):
        return tf_pipeline.make_lm_dataset(inputs, targets, 4, shuffle=True, seed=seed, repeat=True)

    # 26 windows in batches of 4: 20 batches cross three epoch boundaries.
    first = batches(make(7), 20)
    assert_same_batches(first, batches(make(7), 20))
    dataset = make(7)
    batches(dataset, 5)
    assert_same_batches(first, batches(dataset, 20))  # Re-iterating restarts the sequence.
    other_seed = batches(make(8), 20)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other_seed))


def test_dataset_does_not_depend_on_global_seed(windows):
    import tensorflow as tf

    inputs, targets = windows
    tf.random.set_seed(1)
    first = batches(tf_pipeline.make_lm_dataset(inputs, targets, 4, True, 3, True), 10)
    tf.random.set_seed(2)
    second = batches(tf_pipeline.make_lm_dataset(inputs, targets, 4, True, 3, True), 10)
    assert_same_batches(first, second)


def test_each_epoch_is_a_new_permutation_of_all_windows():
    inputs, targets = lm_windows(np.arange(97), 4)  # 24 windows, 6 batches of 4 per epoch.
    dataset = tf_pipeline.make_lm_dataset(inputs, targets, 4, shuffle=True, seed=0, repeat=True)
    ids = [batch_inputs[:, 0] // 4 for batch_inputs, _ in batches(dataset, 12)]
    epoch_one, epoch_two = np.concatenate(ids[:6]), np.concatenate(ids[6:])
    assert sorted(epoch_one.tolist()) == sorted(epoch_two.tolist()) == list(range(24))
    assert epoch_one.tolist() != list(range(24))  # Shuffled...
    assert epoch_one.tolist() != epoch_two.tolist()  # ...differently in each epoch.


def test_skip_batches_equals_dropping_the_first_batches(windows):
    inputs, targets = windows
    full = batches(tf_pipeline.make_lm_dataset(inputs, targets, 4, True, 5, True), 20)
    resumed = tf_pipeline.make_lm_dataset(inputs, targets, 4, True, 5, True, skip_batches=9)
    assert_same_batches(full[9:], batches(resumed, 11))


def test_unshuffled_single_pass_keeps_order_and_remainder(windows):
    inputs, targets = windows
    dataset = tf_pipeline.make_lm_dataset(
        inputs, targets, 4, shuffle=False, seed=0, repeat=False, drop_remainder=False
    )
    result = batches(dataset, 100)
    assert [len(batch_inputs) for batch_inputs, _ in result] == [4] * 6 + [2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in result]), inputs)
    dropped = tf_pipeline.make_lm_dataset(inputs, targets, 4, shuffle=False, seed=0, repeat=False)
    assert len(batches(dropped, 100)) == 6


def test_make_lm_dataset_errors(windows):
    inputs, targets = windows
    make = tf_pipeline.make_lm_dataset
    with pytest.raises(ValueError, match="same|shape"):
        make(inputs, targets[:, :3], 4, True, 0, True)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        make(inputs, targets, 0, True, 0, True)
    with pytest.raises(ValueError, match="batch_size 27 is larger than the 26 windows"):
        make(inputs, targets, 27, True, 0, False)
    with pytest.raises(ValueError, match="skip_batches must be an int >= 0, got -1"):
        make(inputs, targets, 4, True, 0, True, skip_batches=-1)
    with pytest.raises(ValueError, match="skip_batches 7 exceeds the 6 batches"):
        make(inputs, targets, 4, True, 0, False, skip_batches=7)
