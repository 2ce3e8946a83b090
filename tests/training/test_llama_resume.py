"""Llama training phases: checkpoints, exact resume across capacity stages, TensorBoard."""

import glob
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from toex_tf.models import build_llama
from toex_tf.training.llama_training import train_phase

STEPS = 16
# 0.9 -> 0.55 (the model's capacity): stages of 2 steps ending at 2, 4, 6 and 8, then 8.
STAGE_ENDS = (2, 4, 6, 8, 16)
CHECKPOINT_EVERY = 3
CRASH_AFTER = 4  # checkpoint 3 is the last one: the resume starts inside stage 2


class SimulatedCrash(RuntimeError):
    pass


class CrashAfter(keras.callbacks.Callback):
    """Raises after `steps` optimizer steps, counted over every `fit` of a phase."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.seen = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.steps:
            raise SimulatedCrash(f"simulated crash after step {self.seen}")


class CountSteps(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1


def _data(n=16, seq=8, seed=0):
    rng = np.random.default_rng(seed)
    stream = (rng.integers(0, 64, (n, 1)) + np.arange(seq + 1)[None, :]) % 64
    return stream[:, :-1].astype("int32"), stream[:, 1:].astype("int32")


def _model(**overrides):
    keras.utils.set_random_seed(7)  # the same initial weights for every run
    config = dict(hidden_dim=16, num_heads=2, num_kv_heads=1, intermediate_dim=32)
    return build_llama("llama-tiny", **{**config, "exit_layers": (1,), **overrides})


def _train(model, output_dir, phase="full", steps=STEPS, data_seed=0, **kwargs):
    inputs, targets = _data(seed=data_seed)
    # `full`: routers with a capacity schedule and Gumbel-sampled exit gates.
    return train_phase(
        model,
        inputs,
        targets,
        phase,
        steps,
        batch_size=4,
        learning_rate=1e-2,
        capacity_start=0.9,
        seed=3,
        output_dir=str(output_dir),
        checkpoint_every=CHECKPOINT_EVERY,
        **kwargs,
    )


def _scalars(log_dir):
    """`{tag: {step: value}}` of every event file under `log_dir/train`."""
    found = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "train", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("tensor") and not value.tensor.string_val:
                    array = tf.make_ndarray(value.tensor)
                    found.setdefault(value.tag, {})[event.step] = float(array)
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted phase, and the same phase crashed after step 4 then rerun."""
    root = tmp_path_factory.mktemp("llama_resume")
    straight = _model()
    straight_logs = _train(straight, root / "straight")
    with pytest.raises(SimulatedCrash):
        _train(_model(), root / "resumed", callbacks=[CrashAfter(CRASH_AFTER)])
    checkpoints = sorted(os.listdir(root / "resumed" / "checkpoints" / "full"))
    counter = CountSteps()
    resumed = _model()
    resumed_logs = _train(resumed, root / "resumed", callbacks=[counter])
    return {
        "root": root,
        "straight": straight,
        "straight_logs": straight_logs,
        "checkpoints_at_crash": checkpoints,
        "resumed": resumed,
        "resumed_logs": resumed_logs,
        "resumed_steps": counter.steps,
    }


def test_resumed_phase_ends_with_the_same_weights(runs, capsys):
    # Checkpoints at every 3rd step and at each stage's end; step 4 was lost in the crash.
    assert runs["checkpoints_at_crash"][-1] == "ckpt-00000003"
    # The rerun resumed: it ran exactly the steps after the checkpoint, across 4 stages.
    assert runs["resumed_steps"] == STEPS - 3
    straight, resumed = runs["straight"], runs["resumed"]
    assert [w.path for w in straight.weights] == [w.path for w in resumed.weights]
    for a, b in zip(straight.weights, resumed.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    for name in ("lm", "distill", "avg_exit_layer", "router", "capacity"):
        assert runs["resumed_logs"][name] == runs["straight_logs"][name], name
    assert runs["straight_logs"]["capacity"] == pytest.approx(0.55)
    # Rerunning the finished phase resumes at its end and trains no further.
    again = _model()
    counter = CountSteps()
    _train(again, runs["root"] / "resumed", callbacks=[counter])
    assert "at step 16." in capsys.readouterr().out and counter.steps == 0
    for a, b in zip(again.weights, resumed.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)
    # ... which is not the initial model: the phase trained.
    fresh = _model()
    fresh.set_phase("full")
    trained = {w.path for w in fresh.trainable_weights}
    assert trained and any(
        not np.array_equal(np.asarray(w), np.asarray(f))
        for w, f in zip(resumed.weights, fresh.weights, strict=True)
        if w.path in trained
    )


def test_tensorboard_logs_losses_metrics_and_capacity_at_global_steps(runs):
    straight = _scalars(runs["root"] / "straight" / "tensorboard" / "full")
    resumed = _scalars(runs["root"] / "resumed" / "tensorboard" / "full")
    for tag in ("loss", "lm", "distill", "exit_distill", "avg_exit_layer", "router"):
        # Every 10 steps, at the global step (Keras alone restarts at each stage's fit).
        assert set(straight[f"batch_{tag}"]) == {10}, tag
        assert np.isfinite(straight[f"batch_{tag}"][10]), tag
        # One point per capacity stage, at the step it ended.
        assert set(straight[f"epoch_{tag}"]) == set(STAGE_ENDS), tag
    capacities = [straight["epoch_capacity"][step] for step in STAGE_ENDS]
    np.testing.assert_allclose(capacities, [0.9, 0.8125, 0.725, 0.6375, 0.55], atol=1e-6)
    assert straight["batch_capacity"][10] == pytest.approx(0.55)
    assert straight["epoch_loss"][2] != straight["epoch_loss"][16]
    # The crashed run logged stage 1; the resumed one carries on at the same steps.
    assert set(resumed["epoch_loss"]) == set(STAGE_ENDS)
    for tag in ("batch_loss", "batch_lm", "epoch_loss"):
        for step in straight[tag]:
            if step > 4:  # stage 2 was split by the crash: its averages differ
                assert resumed[tag][step] == pytest.approx(straight[tag][step], abs=1e-6)


def test_checkpoint_of_another_run_is_refused_by_name(runs, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(runs["root"] / "straight" / "checkpoints", output_dir / "checkpoints")
    # The same weight shapes, another config: loading the weights alone would succeed.
    with pytest.raises(ValueError, match=r"model_config\.rope_theta is 10000\.0.*500000\.0"):
        _train(_model(rope_theta=500000.0), output_dir)
    with pytest.raises(ValueError, match=r"its schedule is"):
        _train(_model(), output_dir, steps=24)
    with pytest.raises(ValueError, match=r"its windows_sha256 is"):
        _train(_model(), output_dir, data_seed=1)
    # A `full` checkpoint put where the `routers` phase looks is refused, not resumed.
    shutil.copytree(output_dir / "checkpoints" / "full", output_dir / "checkpoints" / "routers")
    with pytest.raises(ValueError, match=r"its phase is 'full'; this run's is 'routers'"):
        _train(_model(), output_dir, phase="routers")


def test_phases_in_one_output_dir_keep_their_own_checkpoints(runs, tmp_path, capsys):
    output_dir = tmp_path / "run"
    shutil.copytree(runs["root"] / "straight", output_dir)
    model = _model()
    _train(model, output_dir, phase="exits", steps=2)
    assert "Resumed" not in capsys.readouterr().out
    assert os.listdir(output_dir / "checkpoints" / "exits") == ["ckpt-00000002"]
    assert sorted(os.listdir(output_dir / "checkpoints")) == ["exits", "full"]
    assert glob.glob(str(output_dir / "tensorboard" / "exits" / "train" / "events.*"))


def test_bad_checkpoint_every(tmp_path):
    inputs, targets = _data()
    for value in (0, 2.5, True):
        with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
            train_phase(
                _model(),
                inputs,
                targets,
                "full",
                4,
                output_dir=str(tmp_path),
                checkpoint_every=value,
            )
