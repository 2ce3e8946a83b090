"""The tokenizer a Llama GGUF's metadata describes, built with `tokenizers`.

Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) from the tokens and merges, split as
`tokenizer.ggml.pre` says; SentencePiece-style (`"llama"`) with merges recovered from the
token scores. `toex_tf.loaders.gguf_file.load_gguf_llama` calls `gguf_tokenizer`.
"""

from __future__ import annotations

from toex_tf.loaders.gguf_file import gguf_metadata
from toex_tf.loaders.handles import CheckpointError

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) for byte-level BPE vocabularies,
# and how each splits text before the merges. SmolLM splits every digit, like its own
# `tokenizer.json` and llama.cpp do.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BYTE_LEVEL_PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "llama-v3")


def _byte_level_pre_tokenizer(pre: str, path: str):
    from tokenizers import Regex, pre_tokenizers  # noqa: PLC0415

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2"):
        return byte_level
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "llama-v3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise CheckpointError(
        f"{path}: byte-level BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not "
        f"supported; supported: {list(BYTE_LEVEL_PRE_TOKENIZERS)}."
    )


def sentencepiece_merges(tokens: list[str], scores) -> list[tuple[str, str]]:
    """BPE merges for a SentencePiece-style vocabulary that stores scores, not merges.

    Every split of a token into two vocabulary pieces is a merge ranked by the token's
    score (higher first), as SentencePiece applies them (the rule of `transformers`'
    `SentencePieceExtractor`, so the ids agree with its GGUF tokenizer).
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        local = [
            (token[:cut], token[cut:], float(score))
            for cut in range(1, len(token))
            if token[:cut] in vocab and token[cut:] in vocab
        ]
        local.sort(key=lambda merge: (vocab[merge[0]], vocab[merge[1]]))
        merges += local
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def gguf_tokenizer(reader, path: str = "GGUF"):
    """The tokenizer a GGUF's metadata describes, as an `HFJsonTokenizer`.

    - `tokenizer.ggml.model == "gpt2"`: byte-level BPE from the tokens and merges, split
      as `tokenizer.ggml.pre` says.
    - `"llama"`: SentencePiece-style BPE with byte fallback, merges recovered from the
      token scores, and a `▁` prefix on the first word (`add_space_prefix`).

    Tokens typed control (3) are special (whole, dropped by `decode`); user-defined (4)
    are matched whole. The bos token is prepended when `tokenizer.ggml.add_bos_token`
    says so (for "llama" vocabularies, when the file does not say, as llama.cpp does).

    For `pre == "smollm"` every digit is split, as SmolLM's own `tokenizer.json` and
    llama.cpp do. (`transformers`' GGUF tokenizer does not split them, but SmolLM's
    vocabulary has no multi-digit token, so the ids agree.)

    Raises:
        CheckpointError: no tokenizer in the metadata, or an unsupported model or
            pre-tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415

    from toex_tf.data.hf_tokenizer import HFJsonTokenizer  # noqa: PLC0415

    meta = gguf_metadata(
        reader,
        [
            "tokenizer.ggml.model",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.scores",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_space_prefix",
        ],
    )
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise CheckpointError(
            f"{path}: the GGUF metadata has no tokenizer (tokenizer.ggml.model and "
            f"tokenizer.ggml.tokens); load it with load_tokenizer=False and bring your own."
        )
    tokens = list(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
        backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
        backend.pre_tokenizer = _byte_level_pre_tokenizer(
            meta.get("tokenizer.ggml.pre", "default"), path
        )
        backend.decoder = decoders.ByteLevel()
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise CheckpointError(f"{path}: a 'llama' tokenizer needs tokenizer.ggml.scores.")
        backend = Tokenizer(
            models.BPE(
                vocab=vocab,
                merges=sentencepiece_merges(tokens, scores),
                fuse_unk=True,
                byte_fallback=True,
            )
        )
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1))
        backend.decoder = decoders.Sequence(steps)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    else:
        raise CheckpointError(
            f"{path}: tokenizer model {kind!r} (tokenizer.ggml.model) is not supported; "
            f"supported: 'gpt2' (byte-level BPE) and 'llama' (SentencePiece-style)."
        )
    types = list(meta.get("tokenizer.ggml.token_type", []))
    control = [tokens[i] for i, kind_ in enumerate(types) if kind_ == 3]
    user = [tokens[i] for i, kind_ in enumerate(types) if kind_ == 4]
    if control:
        backend.add_special_tokens(
            [AddedToken(token, normalized=False, special=True) for token in control]
        )
    if user:
        backend.add_tokens([AddedToken(token, normalized=False) for token in user])
    eos_id = meta.get("tokenizer.ggml.eos_token_id")
    if eos_id is None:
        raise CheckpointError(f"{path}: tokenizer.ggml.eos_token_id is missing.")
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if add_bos and bos_id is None:
        raise CheckpointError(
            f"{path}: tokenizer.ggml.add_bos_token is set but tokenizer.ggml.bos_token_id "
            f"is missing."
        )
    return HFJsonTokenizer.from_backend(
        backend,
        eos_id=int(eos_id),
        bos_id=None if bos_id is None else int(bos_id),
        add_bos=add_bos,
        source=path,
    )
