"""Saving and loading `.keras` model files safely."""

import os

import keras


def save_model_atomically(model: keras.Model, path: str) -> None:
    """Saves `model` to `path` through a temporary file, so a crash never leaves a
    half-written model where a good one was."""
    temporary = path + ".tmp.keras"
    model.save(temporary)
    os.replace(temporary, path)


def load_model(path: str) -> keras.Model:
    """Loads a saved toex_tf model, with a clear error for a missing or corrupt file."""
    if not os.path.exists(path):
        raise ValueError(f"no model at {path!r}: train first (--mode=train).")
    import toex_tf.models  # noqa: F401, PLC0415 - registers the serializable classes

    try:
        return keras.saving.load_model(path)
    except Exception as error:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(
            f"model file {path!r} is corrupt or not a toex_tf model: {error}"
        ) from error
