"""Training the encoder-decoder: padded pairs, the masked exit loss, and `fit`."""

import keras
import numpy as np
import pytest

from toex_tf.config import TrainConfig, transformer_preset
from toex_tf.data.tokenizers import ByteTokenizer
from toex_tf.data.translation_examples import encode_pairs
from toex_tf.models import build_transformer
from toex_tf.training.exit_loss import EarlyExitTrainer
from toex_tf.training.translation_training import train_translation

TOKENIZER = ByteTokenizer()
WORDS = ["cat", "dog", "sun", "map", "red", "box", "cup", "pen"]


def _pairs(count=64, seed=0):
    """A learnable toy task: the target is the source reversed."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        source = " ".join(rng.choice(WORDS, size=rng.integers(1, 3)))
        pairs.append((source, source[::-1]))
    return pairs


def test_encode_pairs_pads_starts_and_ends_with_eos_and_drops_long_pairs():
    examples = encode_pairs([("ab", "xyz"), ("a" * 20, "b"), ("c", "d" * 16)], TOKENIZER, 16, 16)
    assert len(examples) == 1 and examples.dropped == 2
    eos = TOKENIZER.eos_id
    np.testing.assert_array_equal(examples.encoder_token_ids[0, :3], [97, 98, 0])
    np.testing.assert_array_equal(examples.encoder_padding_mask[0, :3], [1, 1, 0])
    np.testing.assert_array_equal(examples.decoder_token_ids[0, :5], [eos, 120, 121, 122, 0])
    np.testing.assert_array_equal(examples.labels[0, :5], [120, 121, 122, eos, 0])
    np.testing.assert_array_equal(examples.weights[0, :5], [1, 1, 1, 1, 0])


def test_padded_positions_do_not_count_in_the_loss():
    keras.utils.set_random_seed(0)
    model = build_transformer("tiny", vocab_size=257)
    examples = encode_pairs(_pairs(4), TOKENIZER, 16, 16)
    trainer = EarlyExitTrainer(model, [0.5, 0.5], distill_weight=1.0)
    outputs = model(examples.inputs)
    loss = trainer.compute_loss(y=examples.labels, y_pred=outputs, sample_weight=examples.weights)
    changed = np.where(examples.weights > 0, examples.labels, 7)  # other labels on padding
    same = trainer.compute_loss(y=changed, y_pred=outputs, sample_weight=examples.weights)
    unweighted = trainer.compute_loss(y=changed, y_pred=outputs)
    np.testing.assert_allclose(float(same), float(loss), rtol=1e-6)
    assert abs(float(unweighted) - float(loss)) > 1e-3


def test_training_learns_the_pairs_and_checks_its_input(tmp_path):
    config = transformer_preset("tiny", vocab_size=257, hidden_dim=32, exit_layers="all")
    examples = encode_pairs(_pairs(), TOKENIZER, 16, 16)
    train_config = TrainConfig(steps=60, batch_size=16, learning_rate=3e-3, warmup_steps=5)
    model = train_translation(config, train_config, examples, str(tmp_path), verbose=0)
    trainer = EarlyExitTrainer(model, [0.5, 0.5])
    loss = float(
        trainer.compute_loss(
            y=examples.labels, y_pred=model(examples.inputs), sample_weight=examples.weights
        )
    )
    assert loss < 0.8 * np.log(257), loss  # learned far more than the uniform guess
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "tensorboard").is_dir()
    with pytest.raises(ValueError, match="max_length is 8"):
        train_translation(
            transformer_preset("tiny", vocab_size=257, max_length=8), train_config, examples, "x"
        )
    with pytest.raises(ValueError, match="vocab_size=64"):
        train_translation(transformer_preset("tiny"), train_config, examples, "x")
    with pytest.raises(ValueError, match="batch_size=128"):
        train_translation(config, TrainConfig(batch_size=128), examples, "x")
