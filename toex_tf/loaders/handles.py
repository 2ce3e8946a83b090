"""Checkpoint handles, resolved to a local directory whatever the model inside:

/path/to/dir                 a local directory (`save_pretrained` layout)
hf://org/name[@revision]     the Hugging Face cache (`huggingface_hub`); offline with
                             `HF_HUB_OFFLINE=1`, which never downloads
kaggle://owner/model/...     a Kaggle Models handle (`kagglehub.model_download`)
https://tfhub.dev/... or
https://www.kaggle.com/models/...
                             a TF-Hub handle (`tensorflow_hub.resolve`)
"""

import os

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: the message names the file or the key."""


def resolve_handle(handle: str) -> str:
    """A local directory holding the checkpoint of `handle` (see the module docstring)."""
    if not isinstance(handle, str) or not handle:
        raise CheckpointError(f"handle must be a non-empty string; got {handle!r}.")
    if handle.startswith("hf://"):
        return _resolve_hf(handle[len("hf://") :])
    if handle.startswith("kaggle://"):
        return _resolve_kaggle(handle[len("kaggle://") :])
    if handle.startswith(("https://tfhub.dev/", "https://www.kaggle.com/models/", "tfhub://")):
        return _resolve_tfhub(handle.replace("tfhub://", "https://tfhub.dev/", 1))
    if "://" in handle:
        scheme = handle.split("://", 1)[0] + "://"
        raise CheckpointError(
            f"unknown handle scheme {scheme!r} in {handle!r}; expected a local directory, "
            f"hf://org/name[@revision], kaggle://owner/model/..., tfhub://..., or an "
            f"https://tfhub.dev/ or https://www.kaggle.com/models/ URL."
        )
    path = os.path.expanduser(handle)
    if os.path.isfile(path):
        raise CheckpointError(
            f"{path!r} is a file; a checkpoint handle is its directory (holding "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}). For a .keras file use "
            f"keras.saving.load_model."
        )
    if not os.path.isdir(path):
        raise CheckpointError(
            f"checkpoint directory {path!r} does not exist (expected a directory with "
            f"{CONFIG_FILE} and {WEIGHTS_FILE}, or an hf://, kaggle:// or TF-Hub handle)."
        )
    return path


def _resolve_hf(repo: str) -> str:
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415 - optional
    except ImportError:
        raise CheckpointError(
            "hf:// handles need huggingface_hub: pip install huggingface_hub."
        ) from None
    repo_id, _, revision = repo.partition("@")
    if repo_id.count("/") != 1:
        raise CheckpointError(f"hf:// handle must be hf://org/name[@revision]; got {repo!r}.")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    try:  # huggingface_hub reads the variable once, at import: either one means offline
        from huggingface_hub import constants  # noqa: PLC0415

        offline = offline or bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):
        pass
    try:
        return snapshot_download(
            repo_id,
            revision=revision or None,
            local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model"],
        )
    except Exception as error:  # noqa: BLE001 - huggingface_hub raises many types
        where = "the local Hugging Face cache" if offline else "the Hugging Face Hub"
        raise CheckpointError(
            f"cannot resolve hf://{repo} from {where}: {type(error).__name__}: {error}"
        ) from error


def _resolve_kaggle(handle: str) -> str:
    try:
        import kagglehub  # noqa: PLC0415 - optional
    except ImportError:
        raise CheckpointError("kaggle:// handles need kagglehub: pip install kagglehub.") from None
    try:
        return kagglehub.model_download(handle)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(
            f"cannot resolve kaggle://{handle}: {type(error).__name__}: {error}"
        ) from error


def _resolve_tfhub(handle: str) -> str:
    try:
        import tensorflow_hub  # noqa: PLC0415 - optional
    except ImportError:
        raise CheckpointError(
            f"{handle} needs tensorflow_hub: pip install tensorflow-hub."
        ) from None
    try:
        return tensorflow_hub.resolve(handle)
    except Exception as error:  # noqa: BLE001
        raise CheckpointError(
            f"cannot resolve {handle}: {type(error).__name__}: {error}"
        ) from error
