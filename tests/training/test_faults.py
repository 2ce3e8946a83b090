"""Faults a training run must survive, or refuse clearly, losing nothing.

- a crash in the middle of a checkpoint write (the previous checkpoint stays usable);
- a full disk while a checkpoint is written (the error names the one that is intact);
- a full or read-only output directory (refused before training starts);
- a checkpoint of another run (refused, the differing setting named).

A killed worker of a multi-worker run is in tests/cli/test_multi_worker.py.
"""

import contextlib
import errno
import os
import shutil
import subprocess

import keras
import numpy as np
import pytest
from cli_runner import TINY, run_cli, write_corpus

from toex_tf.config import TrainConfig, gpt_preset
from toex_tf.models import build_gpt
from toex_tf.training import checkpoint as checkpoint_module
from toex_tf.training.checkpoint import CheckpointManager
from toex_tf.training.tf_train import train

INPUTS = np.random.default_rng(0).integers(0, 64, size=(16, 16)).astype("int32")
TARGETS = np.roll(INPUTS, -1, axis=1)
MODEL = gpt_preset("tiny")


def _config(**kwargs):
    # No XLA: these tests are about files, not the compiled step.
    settings = {"steps": 2, "batch_size": 4, "seq_len": 16, "warmup_steps": 1, "jit_compile": False}
    return TrainConfig(**{**settings, **kwargs})


def _model_and_optimizer():
    model = build_gpt("tiny")
    optimizer = keras.optimizers.AdamW()
    optimizer.build(model.trainable_variables)
    return model, optimizer


class Crash(BaseException):
    """Stands for the process dying: no `except Exception` or `except OSError` sees it."""


def test_a_crash_mid_write_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    manager = CheckpointManager(str(tmp_path))
    good = manager.save(3, model, optimizer)
    saved = [w.copy() for w in model.get_weights()]

    def dies_half_way(path, **arrays):  # the weights are written, the optimizer is not
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise Crash

    monkeypatch.setattr(checkpoint_module.np, "savez", dies_half_way)
    model.set_weights([w + 1.0 for w in saved])
    with pytest.raises(Crash):
        manager.save(6, model, optimizer)
    monkeypatch.undo()
    assert os.path.isdir(tmp_path / "ckpt-00000006.tmp")  # what the crash left
    assert manager.latest() == good
    fresh, fresh_optimizer = _model_and_optimizer()
    assert manager.restore(fresh, fresh_optimizer) == 3
    for a, b in zip(fresh.get_weights(), saved):
        np.testing.assert_array_equal(a, b)
    # The next save replaces the debris.
    manager.save(6, model, optimizer)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000003", "ckpt-00000006"]


def test_a_crash_while_a_checkpoint_is_replaced_keeps_one_complete_copy(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    manager = CheckpointManager(str(tmp_path))
    manager.save(4, model, optimizer)
    real_replace, calls = os.replace, []

    def dies_between_the_renames(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the old ckpt-4 is aside, the new one not yet in place
            raise Crash
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_module.os, "replace", dies_between_the_renames)
    with pytest.raises(Crash):
        manager.save(4, model, optimizer)
    monkeypatch.undo()
    assert calls[0][1].endswith("ckpt-00000004.old")
    assert manager.latest() == str(tmp_path / "ckpt-00000004.old")
    assert manager.restore(*_model_and_optimizer()) == 4


def test_a_full_disk_during_a_save_names_the_intact_checkpoint(tmp_path, monkeypatch):
    model, optimizer = _model_and_optimizer()
    manager = CheckpointManager(str(tmp_path))
    good = manager.save(2, model, optimizer)

    def disk_full(path, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module.np, "savez", disk_full)
    with pytest.raises(OSError, match="ckpt-00000004.*No space left on device") as error:
        manager.save(4, model, optimizer)
    assert repr(good) in str(error.value) and "is intact" in str(error.value)
    assert error.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000002"]  # no debris


@contextlib.contextmanager
def _small_filesystem(path, size_kib, read_only=False):
    """A real tmpfs of `size_kib` at `path` (read-only if asked) where this process may
    mount one (root); yields whether it did."""
    os.makedirs(path, exist_ok=True)
    options = f"size={size_kib}k" + (",ro" if read_only else "")
    mounted = (
        os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(path)], check=True)


def test_a_full_output_directory_is_refused_before_training(tmp_path, monkeypatch):
    out = tmp_path / "small"
    with _small_filesystem(out, 64) as mounted:
        if not mounted:  # not root: the same check, on a disk that says it is full
            monkeypatch.setattr(
                checkpoint_module.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 0)
            )
        fits = []
        with pytest.raises(ValueError, match=r"output_dir .* MiB free; this run needs about"):
            train(MODEL, _config(), INPUTS, TARGETS, str(out), callbacks=[_Record(fits)])
        assert fits == [] and not (out / "checkpoints").exists()


def test_a_read_only_output_directory_is_refused_before_training(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", docs=8)
    out = tmp_path / "read_only"
    with _small_filesystem(out, 64, read_only=True) as mounted:
        if not mounted:  # not root: permissions bind this process
            os.makedirs(out, exist_ok=True)
            os.chmod(out, 0o555)
        with pytest.raises(ValueError, match="output_dir .* is not writable"):
            train(MODEL, _config(), INPUTS, TARGETS, str(out))
        result = run_cli(*TINY, f"--dataset=text:{corpus}", f"--output_dir={out}", "--mode=train")
        assert result.returncode != 0
        assert f"--output_dir {str(out)!r} is not writable" in result.stderr
        assert "Traceback" not in result.stderr


class _Record(keras.callbacks.Callback):
    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def on_train_begin(self, logs=None):
        self.seen.append("fit")


def test_a_checkpoint_of_another_run_is_refused_by_name(tmp_path):
    out = str(tmp_path / "run")
    train(MODEL, _config(), INPUTS, TARGETS, out, verbose=0)
    wider = gpt_preset("tiny", hidden_dim=32)
    with pytest.raises(ValueError, match=r"its model_config\.hidden_dim is \d+; this run's is 32"):
        train(wider, _config(steps=4), INPUTS, TARGETS, out, verbose=0)
    with pytest.raises(ValueError, match="its batch_size is 4; this run's is 8"):
        train(MODEL, _config(steps=4, batch_size=8), INPUTS, TARGETS, out, verbose=0)
    with pytest.raises(ValueError, match="its windows_sha256 is"):
        train(MODEL, _config(steps=4), INPUTS[::-1], TARGETS[::-1], out, verbose=0)
    # The refused runs wrote nothing: the checkpoint still resumes, and more steps train on.
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["ckpt-00000002"]
    train(MODEL, _config(steps=4), INPUTS, TARGETS, out, verbose=0)
    assert sorted(os.listdir(os.path.join(out, "checkpoints")))[-1] == "ckpt-00000004"
