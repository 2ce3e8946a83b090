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

    def __init__(
        self,
        json_file: str,
        eos_token: str | None = None,
        bos_token: str | None = None,
        add_bos: bool = False,
    ):
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
        self._set_bos(bos_token and self._tokenizer.token_to_id(bos_token), add_bos, json_file)

    @classmethod
    def from_backend(
        cls, backend, eos_id: int, bos_id: int | None = None, add_bos: bool = False, source=""
    ) -> HFJsonTokenizer:
        """Wraps a built `tokenizers.Tokenizer` (for example from GGUF metadata).

        Args:
            backend: the `tokenizers.Tokenizer`.
            eos_id: the end-of-sequence id.
            bos_id: the beginning-of-sequence id, or None.
            add_bos: prepend `bos_id` in `encode`.
            source: where it came from, for messages and `repr`.
        """
        if not 0 <= eos_id < backend.get_vocab_size():
            raise ValueError(
                f"eos_id {eos_id} of {source or 'the tokenizer'} is outside its vocabulary "
                f"of {backend.get_vocab_size()}."
            )
        tokenizer = cls.__new__(cls)
        tokenizer._tokenizer = backend
        tokenizer._eos_id = int(eos_id)
        tokenizer.json_file = source
        tokenizer._set_bos(bos_id, add_bos, source)
        return tokenizer

    def _set_bos(self, bos_id, add_bos: bool, source: str) -> None:
        if add_bos and bos_id is None:
            raise ValueError(f"{source}: add_bos needs a bos token that is in the vocabulary.")
        self.bos_id = None if bos_id is None else int(bos_id)
        self.add_bos = bool(add_bos)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, text: str) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        self._tokenizer.save(os.path.join(directory, HF_JSON_FILE))
        bos_token = None if self.bos_id is None else self._tokenizer.id_to_token(self.bos_id)
        return write_manifest(
            directory,
            {
                "type": "hf_json",
                "json_file": HF_JSON_FILE,
                "eos_token": self._tokenizer.id_to_token(self._eos_id),
                "bos_token": bos_token,
                "add_bos": self.add_bos,
            },
        )

    def __repr__(self) -> str:
        return f"HFJsonTokenizer({self.json_file!r}, vocab_size={self.vocab_size})"
