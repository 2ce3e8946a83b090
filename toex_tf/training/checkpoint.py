"""Crash-safe training checkpoints with exact resume.

A checkpoint is a directory `ckpt-00000040/` holding the model weights
(`model.weights.h5`), the optimizer and random-generator state (`optimizer.npz`: Keras
does not save `SeedGenerator` states with the weights, yet dropout and layer dropout
draw from them, so without them a resumed run diverges) and `state.json` with the step
and a SHA-256 of each file. It is written under a temporary name and renamed into
place, so an interrupted save never replaces a good checkpoint with a broken one; a
checkpoint whose files do not match their checksums is reported by name, never loaded.
`state.json` can also hold the settings of the run that wrote it (`run_config`): a
checkpoint of another run (another phase, model or schedule) is then refused by name
rather than resumed into a run it does not belong to.
"""

import hashlib
import json
import os
import re
import shutil

import keras
import numpy as np

STATE_FILE = "state.json"
_CHECKPOINT_NAME = re.compile(r"ckpt-(\d{8})(?:\.old)?")
WEIGHTS_FILE = "model.weights.h5"
OPTIMIZER_FILE = "optimizer.npz"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output_dir(directory: str, needed_bytes: int = 0, name: str = "output_dir") -> None:
    """Fails early, with the reason, when `directory` cannot take a run's files.

    Creates `directory` if needed, writes and removes a probe file (a read-only or
    otherwise unwritable directory fails here, not at the first checkpoint), and compares
    the free space with `needed_bytes`.

    Args:
        directory: str, where the run writes.
        needed_bytes: int, the space the run is expected to need (its checkpoints and
            model); 0: only writability is checked.
        name: str, what the directory is called in the message (a flag or argument name).

    Raises:
        ValueError: naming `name`, the directory, and the free and needed space.
    """
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".toex-write-probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"toex")
        os.remove(probe)
    except OSError as error:
        raise ValueError(
            f"{name} {directory!r} is not writable ({error.strerror or error}); expected a "
            "directory this process can create files in."
        ) from error
    free = shutil.disk_usage(directory).free
    if needed_bytes > free:
        raise ValueError(
            f"{name} {directory!r} has {free / 2**20:.1f} MiB free; this run needs about "
            f"{needed_bytes / 2**20:.1f} MiB (its checkpoints and model). Free space or "
            "choose another directory."
        )


def checkpoint_bytes(model, optimizer) -> int:
    """About the size of one checkpoint: the model's variables and the optimizer's."""
    variables = list(model.variables) + list(optimizer.variables)
    return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables))


def _fsync_directory(path: str) -> None:
    """Flushes a directory's entries (a rename) to disk, where the OS allows it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _fsync_tree(path: str) -> None:
    """Flushes the files of a checkpoint being written, then its directory, so that the
    rename that publishes it never points at data still in the page cache."""
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            os.fsync(f.fileno())
    _fsync_directory(path)


def rng_state_variables(model) -> list:
    """The model's `SeedGenerator` states: its variables that are not weights."""
    weight_ids = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weight_ids]


def _flatten(config: dict, prefix: str = "") -> dict:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`, so a mismatch names the nested key."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class CheckpointManager:
    """Saves and restores (model, optimizer, step) in `directory`.

    Args:
        directory: str, where checkpoints live.
        max_to_keep: int, newest checkpoints kept. Defaults to `3`.
        run_config: dict of JSON values or None: the settings that make a run (phase,
            model config, schedule, ...). Written into every checkpoint; `restore`
            refuses a checkpoint whose `run_config` differs and names the first
            differing key. None (the default): not written, not checked.
        write_directory: str or None: where `save` writes, when it is not `directory`
            (a multi-worker run's non-chief worker writes into a temporary directory of
            its own, and resumes from the chief's checkpoints in `directory`).
    """

    def __init__(
        self,
        directory: str,
        max_to_keep: int = 3,
        run_config: dict | None = None,
        write_directory: str | None = None,
    ):
        self.directory = directory
        self.write_directory = write_directory or directory
        self.max_to_keep = max_to_keep
        # Compared after a JSON round trip, as it is read back (tuples become lists).
        self.run_config = None if run_config is None else json.loads(json.dumps(run_config))

    def checkpoints(self, directory: str | None = None) -> list[str]:
        """Complete checkpoint directories in `directory` (default: the one read),
        oldest first."""
        directory = directory or self.directory
        if not os.path.isdir(directory):
            return []
        # Only complete ones: never `ckpt-N.tmp` (a save in progress or interrupted);
        # `ckpt-N.old` (moved aside while `ckpt-N` was rewritten) only when a crash left
        # no `ckpt-N`.
        names = {}
        for name in sorted(os.listdir(directory)):
            match = _CHECKPOINT_NAME.fullmatch(name)
            if match:
                names.setdefault(match.group(1), name)
        return [os.path.join(directory, names[step]) for step in sorted(names)]

    def latest(self) -> str | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def save(self, step: int, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> str:
        """Writes checkpoint `step` atomically and prunes old ones; returns its path."""
        os.makedirs(self.write_directory, exist_ok=True)
        final = os.path.join(self.write_directory, f"ckpt-{step:08d}")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self._write(tmp, step, model, optimizer)
        except OSError as error:  # a full disk, a lost mount: the older checkpoints stay
            shutil.rmtree(tmp, ignore_errors=True)
            kept = self.checkpoints(self.write_directory)
            intact = f"{kept[-1]!r} is intact" if kept else "no earlier checkpoint exists"
            raise OSError(
                error.errno,
                f"writing checkpoint {final!r} failed ({error.strerror or error}); the "
                f"latest complete checkpoint {intact}.",
            ) from error
        # A checkpoint of the same step is moved aside, not deleted, until the new one is
        # in place: a crash at any point leaves one complete `ckpt-N` (or the older ones).
        old = final + ".old"
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_directory(self.write_directory)
        shutil.rmtree(old, ignore_errors=True)
        for old in self.checkpoints(self.write_directory)[: -self.max_to_keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _write(self, tmp: str, step: int, model, optimizer) -> None:
        """Writes checkpoint `step`'s files into the new directory `tmp`, flushed."""
        os.makedirs(tmp)
        model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
        arrays = {f"v{i:05d}": np.asarray(v) for i, v in enumerate(optimizer.variables)}
        for i, variable in enumerate(rng_state_variables(model)):
            arrays[f"rng{i:05d}"] = np.asarray(variable)
        np.savez(os.path.join(tmp, OPTIMIZER_FILE), **arrays)
        state = {
            "step": int(step),
            "sha256": {
                name: _sha256(os.path.join(tmp, name)) for name in (WEIGHTS_FILE, OPTIMIZER_FILE)
            },
        }
        if self.run_config is not None:
            state["run_config"] = self.run_config
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f)
        _fsync_tree(tmp)

    def restore(self, model, optimizer, path: str | None = None) -> int:
        """Loads checkpoint `path` (default: the latest) into model and optimizer.

        Returns:
            The step the checkpoint was taken at.

        Raises:
            ValueError: when there is no checkpoint, or it is corrupt or does not
                match the model; the message names the file.
        """
        path = path or self.latest()
        if path is None:
            raise ValueError(f"no checkpoint found in {self.directory!r}.")
        state_path = os.path.join(path, STATE_FILE)
        try:
            with open(state_path) as f:
                state = json.load(f)
            step = int(state["step"])
            checksums = state["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"checkpoint state {state_path!r} is missing or corrupt: {error}"
            ) from error
        self._check_run_config(path, state.get("run_config") or {})
        for name, expected in checksums.items():
            file_path = os.path.join(path, name)
            if not os.path.exists(file_path):
                raise ValueError(f"checkpoint file {file_path!r} is missing.")
            if _sha256(file_path) != expected:
                raise ValueError(
                    f"checkpoint file {file_path!r} is corrupt (its SHA-256 does not match "
                    f"{STATE_FILE})."
                )
        try:
            model.load_weights(os.path.join(path, WEIGHTS_FILE))
        except Exception as error:  # noqa: BLE001 - re-raised with the file named
            raise ValueError(
                f"checkpoint weights {os.path.join(path, WEIGHTS_FILE)!r} do not match the "
                f"model: {error}"
            ) from error
        with np.load(os.path.join(path, OPTIMIZER_FILE)) as saved:
            arrays = [saved[name] for name in sorted(saved.files) if name.startswith("v")]
            rng_states = [saved[name] for name in sorted(saved.files) if name.startswith("rng")]
        rng_variables = rng_state_variables(model)
        if len(rng_states) != len(rng_variables):
            raise ValueError(
                f"checkpoint {os.path.join(path, OPTIMIZER_FILE)!r} has {len(rng_states)} "
                f"random-generator states; the model has {len(rng_variables)}."
            )
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        if len(arrays) != len(optimizer.variables):
            raise ValueError(
                f"checkpoint optimizer state {os.path.join(path, OPTIMIZER_FILE)!r} has "
                f"{len(arrays)} variables; the optimizer has {len(optimizer.variables)}."
            )
        for variable, value in zip(optimizer.variables, arrays):
            if tuple(variable.shape) != value.shape:
                raise ValueError(
                    f"checkpoint optimizer variable {variable.path!r} has shape {value.shape}; "
                    f"expected {tuple(variable.shape)}."
                )
            variable.assign(value)
        for variable, value in zip(rng_variables, rng_states):
            variable.assign(value)
        return step

    def _check_run_config(self, path: str, saved: dict) -> None:
        if self.run_config is None:
            return
        expected, saved = _flatten(self.run_config), _flatten(saved)
        for key in sorted(set(expected) | set(saved)):
            if saved.get(key) != expected.get(key):
                raise ValueError(
                    f"checkpoint {path!r} belongs to another run: its {key} is "
                    f"{saved.get(key)!r}; this run's is {expected.get(key)!r}. Rerun with the "
                    f"same settings to resume, or use another output directory."
                )


class CheckpointEvery(keras.callbacks.Callback):
    """Saves a checkpoint every `every` optimizer steps and at the end of each `fit`.

    One instance can serve several `fit` calls (a Llama phase's capacity stages): it
    counts the steps of all of them.

    Args:
        manager: the `CheckpointManager`.
        model: what `manager` saves: the weights and random-generator states.
        every: int, steps between checkpoints.
        initial_step: int, the step training starts (or resumes) at.
    """

    def __init__(self, manager: CheckpointManager, model, every: int, initial_step: int):
        super().__init__()
        self.manager = manager
        self.inner_model = model
        self.every = every
        self.step = initial_step
        self.saved_step = initial_step

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1
        if self.step % self.every == 0:
            self.manager.save(self.step, self.inner_model, self.model.optimizer)
            self.saved_step = self.step

    def on_train_end(self, logs=None):
        if self.step != self.saved_step:
            self.manager.save(self.step, self.inner_model, self.model.optimizer)
