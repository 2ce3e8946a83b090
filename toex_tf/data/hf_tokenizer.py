"""`HFJsonTokenizer`: a Hugging Face `tokenizer.json` (the `tokenizers` library)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from toex_tf.data.tokenizers import Tokenizer, write_manifest

HF_JSON_FILE = "hf_tokenizer.json"
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")


class HFJsonTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (the `tokenizers` library), as in Llama checkpoints.

    Args:
        json_file: str. Path of the `tokenizer.json`.
        eos_token: str or None, the end-of-sequence token; None: the first of
            `</s>`, `<|endoftext|>`, `<|end_of_text|>`, `<eos>` in the vocabulary.

    Raises:
        ValueError: if the file is missing or invalid, `tokenizers` is not installed, or
            no eos token is found.
    """

    def __init__(self, json_file: str, eos_token: str | None = None):
        try:
            import tokenizers  # Lazy: only checkpoints with a tokenizer.json need it.
        except ImportError:
            raise ValueError(
                f"{json_file} needs the tokenizers library: pip install tokenizers."
            ) from None
        if not os.path.isfile(json_file):
            raise ValueError(f"json_file {json_file!r} does not exist.")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(json_file)
        except Exception as error:  # noqa: BLE001 - tokenizers raises its own exceptions
            raise ValueError(f"{json_file!r} is not a valid tokenizer.json ({error}).") from error
        candidates = (eos_token,) if eos_token else EOS_CANDIDATES
        ids = [self._tokenizer.token_to_id(token) for token in candidates]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise ValueError(f"{json_file!r} has none of the eos tokens {list(candidates)}.")
        self._eos_id = ids[0]
        self.json_file = json_file

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        self._tokenizer.save(os.path.join(directory, HF_JSON_FILE))
        return write_manifest(directory, {"type": "hf_json", "json_file": HF_JSON_FILE})

    def __repr__(self) -> str:
        return f"HFJsonTokenizer({self.json_file!r}, vocab_size={self.vocab_size})"
