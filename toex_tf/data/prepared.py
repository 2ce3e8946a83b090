"""A corpus made ready for a run: split, tokenizer trained (or reloaded), LM windows."""

import os
from dataclasses import dataclass

import numpy as np

from toex_tf.config import DataConfig
from toex_tf.data.corpus import load_documents, split_documents
from toex_tf.data.token_stream import encode_documents, lm_windows, token_frequencies
from toex_tf.data.tokenizers import load_tokenizer, make_tokenizer


@dataclass
class PreparedData:
    """The splits as LM windows, the tokenizer and the training token counts."""

    tokenizer: object
    train_inputs: np.ndarray
    train_targets: np.ndarray
    val_inputs: np.ndarray
    val_targets: np.ndarray
    token_counts: np.ndarray


def prepare_data(
    data: DataConfig, seq_len: int, output_dir: str, seed: int = 0, tokenizer=None
) -> PreparedData:
    """Loads and splits the corpus, trains (or reloads) the tokenizer, cuts LM windows.

    Args:
        data: where the text comes from and how it is tokenized.
        seq_len: int, the window length.
        output_dir: the run directory; the tokenizer is kept in `output_dir/tokenizer`.
        seed: int, the split's seed.
        tokenizer: None, or the tokenizer to use (a loaded model's); it is saved to
            `output_dir/tokenizer` when that holds none. None: the one there, else one
            trained on the training split only and saved there, so a later run (resume,
            eval) reloads it and ids never shift.
    """
    from toex_tf.progress import Progress  # noqa: PLC0415

    progress = Progress(4, "data")
    documents = load_documents(
        data.dataset, data_dir=data.data_dir, tfds_text_key=data.tfds_text_key
    )
    progress.update(1, f"{len(documents)} documents read")
    train_docs, val_docs = split_documents(documents, data.validation_fraction, seed=seed)
    tokenizer_dir = os.path.join(output_dir, "tokenizer")
    saved = os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json"))
    if tokenizer is not None:
        if not saved:
            tokenizer.save(tokenizer_dir)
    elif saved:
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        vocab_size = data.vocab_size if data.tokenizer == "sentencepiece" else None
        tokenizer = make_tokenizer(data.tokenizer, train_docs, vocab_size, tokenizer_dir)
    progress.update(2, "tokenizer ready")
    train_stream = encode_documents(train_docs, tokenizer)
    progress.update(3, "training split encoded")
    val_stream = encode_documents(val_docs, tokenizer)
    progress.update(4, "held-out split encoded")
    train_inputs, train_targets = lm_windows(train_stream, seq_len)
    val_inputs, val_targets = lm_windows(val_stream, seq_len)
    print(
        f"Data: {len(train_docs)} train / {len(val_docs)} held-out documents, "
        f"{len(train_stream)} / {len(val_stream)} tokens, vocab {tokenizer.vocab_size}."
    )
    return PreparedData(
        tokenizer=tokenizer,
        train_inputs=train_inputs,
        train_targets=train_targets,
        val_inputs=val_inputs,
        val_targets=val_targets,
        token_counts=token_frequencies(train_stream, tokenizer.vocab_size),
    )


def held_out_prompts(
    data: DataConfig, tokenizer, count: int, length: int, seed: int = 0
) -> np.ndarray:
    """`count` prompts of `length` tokens, evenly spaced over the held-out split.

    The split is `prepare_data`'s (same documents, fraction and seed), so no prompt comes
    from training text; `tokenizer` must be the model's.

    Returns:
        int32 `(count, length)`.
    """
    if tokenizer is None:
        raise ValueError("held-out prompts need the model's tokenizer; the model has none.")
    documents = load_documents(
        data.dataset, data_dir=data.data_dir, tfds_text_key=data.tfds_text_key
    )
    _, held_out = split_documents(documents, data.validation_fraction, seed=seed)
    stream = encode_documents(held_out, tokenizer)
    if len(stream) <= length:
        raise ValueError(
            f"the held-out split has {len(stream)} tokens; prompt_length={length} needs more. "
            "Use a shorter prompt or a larger validation_fraction."
        )
    starts = np.linspace(0, len(stream) - length - 1, count).astype(int)
    return np.stack([stream[s : s + length] for s in starts]).astype("int32")
