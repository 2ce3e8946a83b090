"""Reading safetensors checkpoints (one file, or the shards of an index) tensor by tensor.

`SafetensorsTensors` checks every key, shape and dtype from the headers, then reads one
tensor at a time, so a loader needs about the model's own memory plus its largest tensor.
"""

import json
import os
from collections.abc import Mapping

import ml_dtypes  # noqa: F401 - registers bfloat16 with NumPy before safetensors reads it
import numpy as np

from toex_tf.loaders.handles import WEIGHTS_FILE, CheckpointError

INDEX_FILE = "model.safetensors.index.json"
# The safetensors dtypes the loader converts from (bf16, fp16, fp32).
SAFETENSORS_DTYPES = ("BF16", "F16", "F32")
# Buffers some checkpoints carry that hold no weights (recomputed from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _weight_files(directory: str) -> tuple[list[str], dict | None]:
    """The checkpoint's weight files, and the index's `{key: file path}` (None unsharded)."""
    if not isinstance(directory, (str, os.PathLike)) or not directory:
        raise CheckpointError(f"directory must be a path string; got {directory!r}.")
    if os.path.isfile(directory):
        raise CheckpointError(
            f"{directory} is a file; give the checkpoint directory that holds {WEIGHTS_FILE} "
            f"or {INDEX_FILE}."
        )
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory {directory} does not exist.")
    index = os.path.join(directory, INDEX_FILE)
    listed = None
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            listed = {key: os.path.join(directory, name) for key, name in weight_map.items()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{index} is not a valid safetensors index: {error}") from error
        paths = sorted(set(listed.values()))
    elif os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        paths = [os.path.join(directory, WEIGHTS_FILE)]
    else:
        raise CheckpointError(
            f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE} (only safetensors "
            f"checkpoints are read)."
        )
    for path in paths:
        if not os.path.isfile(path):
            raise CheckpointError(f"weight file {path} (listed in {INDEX_FILE}) is missing.")
    return paths, listed


class SafetensorsTensors(Mapping):
    """The tensors of a safetensors checkpoint (one file, or the shards of its index) by
    key, each read from disk when it is accessed.

    The constructor reads the headers only: every key's file, shape and dtype. So
    `shape(key)` costs nothing and `assign_hf_weights` refuses a checkpoint that does not
    fit the model before it reads any data. `tensors[key]` opens the key's file, reads
    that one tensor and closes the file: an open `safe_open` keeps its memory map, and
    every page read through it counts in the process's RSS until the map closes (reading
    a 1 GB file of 128 MB tensors through one handle peaked at 1.18 GB RSS; reopened per
    tensor, at 0.28 GB).
    bf16 tensors come back as `ml_dtypes.bfloat16` arrays.

    Args:
        directory: str. The checkpoint directory (`model.safetensors`, or the shards
            listed in `model.safetensors.index.json`).

    Raises:
        CheckpointError: an unreadable, truncated or corrupt file; a key in two shards or
            listed in the index but absent from its shard; a dtype other than
            `SAFETENSORS_DTYPES`; each named with its file.
    """

    def __init__(self, directory: str):
        paths, listed = _weight_files(directory)
        self._headers = {}  # key -> (file path, shape, safetensors dtype)
        for path in paths:
            for key, shape, dtype in _read_header(path):
                if key in self._headers:
                    raise CheckpointError(
                        f"key {key!r} appears in two shards ({self._headers[key][0]} and {path})."
                    )
                if dtype not in SAFETENSORS_DTYPES and not key.endswith(IGNORED_SUFFIXES):
                    raise CheckpointError(
                        f"{path}: tensor {key!r} (shape {shape}) has dtype {dtype}; "
                        f"supported dtypes: {', '.join(SAFETENSORS_DTYPES)}."
                    )
                self._headers[key] = (path, shape, dtype)
        for key, path in (listed or {}).items():
            if key not in self._headers or self._headers[key][0] != path:
                raise CheckpointError(
                    f"tensor {key!r} is listed in {INDEX_FILE} under {path}, which does not "
                    f"hold it."
                )

    def file(self, key: str) -> str:
        """The path of the file that holds `key`."""
        return self._headers[key][0]

    def shape(self, key: str) -> tuple:
        """The shape of `key`, from its file's header."""
        return self._headers[key][1]

    def __getitem__(self, key: str) -> np.ndarray:
        from safetensors import safe_open  # noqa: PLC0415 - a heavy import, only for loading

        path = self._headers[key][0]
        try:
            with safe_open(path, framework="numpy") as f:
                return f.get_tensor(key)  # a copy: it outlives the file's memory map
        except Exception as error:  # noqa: BLE001 - safetensors raises its own types
            raise CheckpointError(
                f"cannot read tensor {key!r} from {path} (truncated or corrupt safetensors "
                f"file?): {type(error).__name__}: {error}"
            ) from error

    def __iter__(self):
        return iter(self._headers)

    def __len__(self) -> int:
        return len(self._headers)


def _read_header(path: str) -> list[tuple[str, tuple, str]]:
    # `(key, shape, dtype)` of every tensor in `path`, from its header: no data is read.
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(path, framework="numpy") as f:
            slices = [(key, f.get_slice(key)) for key in f.keys()]  # noqa: SIM118
            return [(key, tuple(s.get_shape()), s.get_dtype()) for key, s in slices]
    except Exception as error:  # noqa: BLE001 - safetensors raises its own types
        raise CheckpointError(
            f"cannot read {path} (truncated or corrupt safetensors file?): "
            f"{type(error).__name__}: {error}"
        ) from error


def read_safetensors(directory: str) -> dict:
    """Every tensor of the checkpoint in `directory` as NumPy arrays, by key.

    bf16 tensors come back as `ml_dtypes.bfloat16` arrays. This holds the whole
    checkpoint in memory; `load_llama` reads through `SafetensorsTensors` instead.
    """
    tensors = SafetensorsTensors(directory)
    return {key: tensors[key] for key in tensors}
