import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from toex_tf.config import TrainConfig, gpt_preset
from toex_tf.models import build_gpt
from toex_tf.training.checkpoint import CheckpointManager
from toex_tf.training.tf_train import train

RNG = np.random.default_rng(0)
INPUTS = RNG.integers(0, 64, size=(40, 16)).astype("int32")
TARGETS = np.roll(INPUTS, -1, axis=1)
# Dropout, layer dropout and SkipRouter capacity all draw randomness or add losses in fit.
MODEL = gpt_preset("tiny", dropout=0.1, layer_dropout=0.3, capacity=0.5)


def _config(**kwargs):
    return TrainConfig(
        **{
            "steps": 6,
            "batch_size": 4,
            "seq_len": 16,
            "warmup_steps": 2,
            "checkpoint_every": 2,
            **kwargs,
        }
    )


class CrashAt(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            raise KeyboardInterrupt("simulated crash")


class CountBatches(keras.callbacks.Callback):
    """Counts the optimizer steps one `train` call runs."""

    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


def test_interrupted_and_resumed_run_ends_with_the_same_weights(tmp_path):
    straight = train(MODEL, _config(), INPUTS, TARGETS, str(tmp_path / "a"), verbose=0)
    with pytest.raises(KeyboardInterrupt):
        # Crashes after step 5: checkpoint 4 is the last one, step 5 is lost.
        train(
            MODEL,
            _config(),
            INPUTS,
            TARGETS,
            str(tmp_path / "b"),
            callbacks=[CrashAt(5)],
            verbose=0,
        )
    manager = CheckpointManager(str(tmp_path / "b" / "checkpoints"))
    assert os.path.basename(manager.latest()) == "ckpt-00000004"
    # train() reseeds and rebuilds deterministically, so equal weights alone would not
    # prove a restore: the resumed call must run exactly the two steps after checkpoint 4.
    counter = CountBatches()
    resumed = train(
        MODEL, _config(), INPUTS, TARGETS, str(tmp_path / "b"), callbacks=[counter], verbose=0
    )
    assert counter.batches == 2
    for a, b in zip(straight.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)
    # A resumed run really continued: its weights differ from the step-4 checkpoint.
    at_four = build_gpt(MODEL)
    at_four.load_weights(
        os.path.join(tmp_path, "b", "checkpoints", "ckpt-00000004", "model.weights.h5")
    )
    assert any(
        not np.array_equal(a, b) for a, b in zip(at_four.get_weights(), resumed.get_weights())
    )


def test_restore_errors_name_the_problem(tmp_path):
    model = build_gpt("tiny")
    optimizer = keras.optimizers.AdamW()
    optimizer.build(model.trainable_variables)
    manager = CheckpointManager(str(tmp_path / "ckpts"))
    with pytest.raises(ValueError, match="no checkpoint found"):
        manager.restore(model, optimizer)
    path = manager.save(3, model, optimizer)
    assert manager.restore(build_gpt("tiny"), optimizer) == 3

    bigger = build_gpt("tiny", hidden_dim=32)
    with pytest.raises(ValueError, match="do not match the model"):
        manager.restore(bigger, optimizer)

    weights = os.path.join(path, "model.weights.h5")
    with open(weights, "r+b") as f:
        f.seek(100)
        f.write(b"garbage")
    with pytest.raises(ValueError, match="model.weights.h5.*corrupt"):
        manager.restore(model, optimizer)

    os.remove(weights)
    with pytest.raises(ValueError, match="missing"):
        manager.restore(model, optimizer)

    with open(os.path.join(path, "state.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="state.json.*corrupt"):
        manager.restore(model, optimizer)


def test_interrupted_save_never_replaces_a_good_checkpoint(tmp_path):
    model = build_gpt("tiny")
    optimizer = keras.optimizers.AdamW()
    optimizer.build(model.trainable_variables)
    manager = CheckpointManager(str(tmp_path), max_to_keep=2)
    for step in (1, 2, 3):
        manager.save(step, model, optimizer)
    os.makedirs(tmp_path / "ckpt-00000009.tmp")  # a save that died half-way
    assert [os.path.basename(p) for p in manager.checkpoints()] == [
        "ckpt-00000002",
        "ckpt-00000003",
    ]
    assert manager.restore(model, optimizer) == 3


def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    code = f"""
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
from toex_tf.config import TrainConfig, gpt_preset
from toex_tf.training.tf_distribute import make_strategy
from toex_tf.training.tf_train import train
assert make_strategy("mirrored").num_replicas_in_sync == 2
rng = np.random.default_rng(0)
x = rng.integers(0, 64, size=(32, 16)).astype("int32")
model = train(gpt_preset("tiny"), TrainConfig(steps=3, batch_size=8, seq_len=16, warmup_steps=1,
              checkpoint_every=3, strategy="mirrored"), x, np.roll(x, -1, 1), {str(tmp_path)!r},
              verbose=0)
out = model(x[:2])["exit_logits"][-1]
assert np.isfinite(np.asarray(out)).all()
print("replicas", make_strategy("mirrored").num_replicas_in_sync)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "replicas 2" in result.stdout
    assert os.path.isdir(tmp_path / "checkpoints" / "ckpt-00000003")


def test_bad_training_inputs(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train(MODEL, _config(), INPUTS + 100, TARGETS, str(tmp_path), verbose=0)
    with pytest.raises(ValueError, match="max_length"):
        long = np.zeros((8, 64), "int32")
        train(MODEL, _config(), long, long, str(tmp_path), verbose=0)
    with pytest.raises(ValueError, match="steps"):
        train(MODEL, _config(steps=0), INPUTS, TARGETS, str(tmp_path), verbose=0)
