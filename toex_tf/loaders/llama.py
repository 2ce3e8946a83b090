"""Imports Hugging Face Llama checkpoints (TinyLlama-1.1B) into `HierarchicalLlama`.

A checkpoint is a directory with `config.json` and `model.safetensors` (or shards listed
in `model.safetensors.index.json`), in bf16, fp16 or fp32, plus an optional tokenizer
(`tokenizer.model` or `tokenizer.json`), named by a path or a handle
(`toex_tf.loaders.handles`). Every weight goes through one
mapping table with a shape check; missing or unexpected keys, shape mismatches,
truncated files and an unknown `model_type` raise errors that name the key or the file.
The checks read the safetensors headers only; then the tensors are read, cast and
assigned one at a time (`SafetensorsTensors`), so loading needs about the model's own
memory plus its largest tensor, not twice the model.

`export_llama` writes the base of a `HierarchicalLlama` back in the same layout, so a
model pretrained here is a checkpoint like any other (and `transformers` reads it).
"""

import json
import os
from typing import NamedTuple

import keras
import ml_dtypes  # noqa: F401 - registers bfloat16 with NumPy before safetensors reads it
import numpy as np

from toex_tf.config import LlamaConfig
from toex_tf.layers import SkipRouter
from toex_tf.loaders.handles import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, resolve_handle
from toex_tf.loaders.safetensors_file import (  # noqa: F401 - INDEX_FILE is re-exported
    IGNORED_SUFFIXES,
    INDEX_FILE,
    SafetensorsTensors,
    read_safetensors,
)


def read_hf_config(directory: str) -> dict:
    """The checkpoint's `config.json` as a dict."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: a Llama checkpoint needs its {CONFIG_FILE}.")
    try:
        with open(path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object.")
    return config


def _rope_theta(config: dict, path: str) -> float:
    # transformers >= 5 writes `rope_parameters`; older checkpoints (TinyLlama) a flat
    # `rope_theta` and an optional `rope_scaling`.
    parameters = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    for name, source in (("rope_parameters", parameters), ("rope_scaling", scaling)):
        if not isinstance(source, dict):
            raise CheckpointError(f"{path}: {name} must be an object; got {source!r}.")
    for source in (parameters, scaling):  # either one asking for scaling is refused
        rope_type = source.get("rope_type") or source.get("type") or "default"
        if rope_type != "default":
            raise CheckpointError(
                f"{path}: RoPE scaling {rope_type!r} is not supported; only plain RoPE "
                f"(rope_type 'default') is."
            )
    return _number(
        float, "rope_theta", parameters.get("rope_theta", config.get("rope_theta", 10000.0)), path
    )


def _number(kind, name: str, value, path: str):
    """`kind(value)` (int or float) for config field `name`, or an error naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{path}: {name} must be a number; got {value!r}.")
    if kind is int and value != int(value):
        raise CheckpointError(f"{path}: {name} must be an integer; got {value!r}.")
    return kind(value)


def llama_config_from_hf(config: dict, path: str = CONFIG_FILE, **overrides) -> LlamaConfig:
    """Maps a Hugging Face Llama `config.json` dict to a `LlamaConfig`.

    Args:
        config: the parsed `config.json`.
        path: its path, for error messages.
        **overrides: `LlamaConfig` fields set on top (`exit_layers`, `capacity`,
            `max_length`, ...).
    """
    model_type = config.get("model_type")
    if model_type != "llama":
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not supported; load_llama reads "
            f"model_type 'llama' checkpoints."
        )
    activation = config.get("hidden_act", "silu")
    if activation != "silu":
        raise CheckpointError(f"{path}: hidden_act {activation!r} is not supported (only silu).")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise CheckpointError(f"{path}: {flag}=true is not supported.")
    required = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "rms_norm_eps",
    )
    missing = [name for name in required if name not in config]
    if missing:
        raise CheckpointError(f"{path}: missing fields {missing}.")

    def integer(name, default=None):
        return _number(int, name, config.get(name, default), path)

    fields = dict(
        vocab_size=integer("vocab_size"),
        max_length=integer("max_position_embeddings", 2048),
        hidden_dim=integer("hidden_size"),
        num_layers=integer("num_hidden_layers"),
        num_heads=integer("num_attention_heads"),
        num_kv_heads=_number(
            int,
            "num_key_value_heads",
            config.get("num_key_value_heads") or config["num_attention_heads"],
            path,
        ),
        head_dim=config.get("head_dim"),
        intermediate_dim=integer("intermediate_size"),
        # Taken from the checkpoint, never a default (DESIGN.md §4).
        norm_epsilon=_number(float, "rms_norm_eps", config["rms_norm_eps"], path),
        rope_theta=_rope_theta(config, path),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )
    try:
        return LlamaConfig(**{**fields, **overrides})
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from error


def hf_config_from_llama(config: LlamaConfig, dtype: str = "float32") -> dict:
    """The Hugging Face `config.json` dict of a `LlamaConfig` (`llama_config_from_hf`'s
    inverse on the architecture fields; exits and routers have no HF counterpart)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_dim,
        "intermediate_size": config.intermediate_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_length,
        "rms_norm_eps": config.norm_epsilon,
        "rope_theta": config.rope_theta,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }


class WeightSlot(NamedTuple):
    """Where one Hugging Face tensor goes: `variable`, transposed or not, and with `rows`
    `(start, stop)` only that block of the variable's output units (a fused `qkv`
    kernel holds `q_proj`, `k_proj` and `v_proj`); `rows=None`: the whole variable."""

    key: str
    variable: object
    transpose: bool
    rows: tuple | None = None

    def region(self):
        """The index of this slot's block in the variable (outputs are axis 1 of a
        transposed `(in, out)` kernel)."""
        if self.rows is None:
            return (slice(None),)
        block = slice(*self.rows)
        return (slice(None), block) if self.transpose else (block,)


def weight_table(model) -> list[WeightSlot]:
    """The mapping `WeightSlot(hf_key, keras_variable, transpose, rows)` of `model`'s base.

    Hugging Face stores Linear weights `(out, in)`: so do `Linear` kernels (the default
    `kernel_layout="out_in"`); Keras `Dense` kernels (`"in_out"`) take the transpose.
    With `fused_qkv`, `q_proj`, `k_proj` and `v_proj` are row blocks of one kernel.
    """
    config = model.config
    transpose = config.kernel_layout == "in_out"
    embedding = model.token_embedding
    table = [WeightSlot("model.embed_tokens.weight", embedding.embeddings, False)]
    if not config.tie_embeddings:
        table.append(WeightSlot("lm_head.weight", embedding.output_embeddings, False))
    query_width = config.num_heads * config.head_dim
    kv_width = config.num_kv_heads * config.head_dim
    for index, block in enumerate(model.blocks):
        prefix = f"model.layers.{index}."
        transformer = block.block
        attention = transformer.self_attention
        ffn = transformer.ffn.layer if isinstance(transformer.ffn, SkipRouter) else transformer.ffn
        linear = {
            "self_attn.o_proj": attention.output_dense,
            "mlp.gate_proj": ffn.gate_dense,
            "mlp.up_proj": ffn.up_dense,
            "mlp.down_proj": ffn.down_dense,
        }
        if attention.fused_qkv:
            kernel = attention.qkv_dense.kernel
            bounds = (0, query_width, query_width + kv_width, query_width + 2 * kv_width)
            for name, rows in zip(("q_proj", "k_proj", "v_proj"), zip(bounds, bounds[1:])):
                table.append(
                    WeightSlot(f"{prefix}self_attn.{name}.weight", kernel, transpose, rows)
                )
        else:
            linear = {
                "self_attn.q_proj": attention.query_dense,
                "self_attn.k_proj": attention.key_dense,
                "self_attn.v_proj": attention.value_dense,
                **linear,
            }
        table += [
            WeightSlot(f"{prefix}{name}.weight", dense.kernel, transpose)
            for name, dense in linear.items()
        ]
        table += [
            WeightSlot(prefix + "input_layernorm.weight", transformer.attention_norm.scale, False),
            WeightSlot(
                prefix + "post_attention_layernorm.weight", transformer.ffn_norm.scale, False
            ),
        ]
    table.append(WeightSlot("model.norm.weight", model.blocks[-1].exit_norm.scale, False))
    return table


def _shape(tensors, key: str) -> tuple:
    # A lazy mapping (`SafetensorsTensors`, `GGUFTensors`) gives shapes from its header
    # without reading data.
    shape = getattr(tensors, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(np.shape(tensors[key]))


def assign_hf_weights(model, tensors, source: str = "checkpoint") -> None:
    """Assigns Hugging Face Llama `tensors` to `model`'s base, checking every key and shape.

    `tensors` is a mapping from Hugging Face keys to arrays: a dict, or a lazy mapping
    with a `shape(key)` method (`SafetensorsTensors`,
    `toex_tf.loaders.gguf_file.GGUFTensors`) whose values are read one at a time, as
    they are assigned, each once. Every key and shape is checked first (from the
    headers, for a lazy mapping): nothing is read or assigned unless all fit. Each
    tensor is cast to its variable's dtype as it is assigned.

    The non-final exits' norms start as copies of the final norm (`model.norm`); routers
    and gates keep their fresh initialisation (they are trained on the frozen base).

    Raises:
        CheckpointError: missing or unexpected keys, or a shape mismatch, named.
    """
    table = weight_table(model)
    named = getattr(tensors, "gguf_name", lambda key: key)  # GGUF files name their own
    file_of = getattr(tensors, "file", None)  # a lazy mapping names each key's file
    expected = {slot.key for slot in table}
    present = {key for key in tensors if not key.endswith(IGNORED_SUFFIXES)}
    if model.config.tie_embeddings:
        present.discard("lm_head.weight")  # some tied checkpoints store the copy
    missing = sorted(named(key) for key in expected - present)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(f"{source}: {len(missing)} missing weight(s): {shown}")
    unexpected = sorted(named(key) for key in present - expected)
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected weight(s) (not a plain Llama of this "
            f"config?): {shown}"
        )
    for slot in table:  # every shape first: nothing is assigned unless all fit
        shape = tuple(slot.variable.shape)
        target_shape = np.broadcast_to(np.empty((), bool), shape)[slot.region()].shape
        value_shape = _shape(tensors, slot.key)
        if (value_shape[::-1] if slot.transpose else value_shape) != target_shape:
            wanted = target_shape[::-1] if slot.transpose else target_shape
            where = f" (in {file_of(slot.key)})" if file_of else ""
            raise CheckpointError(
                f"{source}: weight {named(slot.key)!r}{where} has shape {value_shape}; the "
                f"config expects {wanted}."
            )
    # Then one tensor at a time, each read once and dropped before the next is read: with
    # a lazy mapping, peak memory is the model plus about one tensor.
    final_norm = None  # kept (one vector): the non-final exits' norms start from it
    fused = {}  # id(variable) -> its row-block slots: filled into one array, then assigned
    for slot in table:
        if slot.rows is not None:
            fused.setdefault(id(slot.variable), []).append(slot)
            continue
        value = np.asarray(tensors[slot.key])
        if slot.key == "model.norm.weight":
            final_norm = value.astype("float32")
        dtype = keras.backend.standardize_dtype(slot.variable.dtype)
        slot.variable.assign((value.T if slot.transpose else value).astype(dtype, copy=False))
        del value
    for slots in fused.values():  # one variable at a time: peak memory is one kernel
        variable = slots[0].variable
        whole = np.empty(tuple(variable.shape), keras.backend.standardize_dtype(variable.dtype))
        for slot in slots:
            value = np.asarray(tensors[slot.key])
            whole[slot.region()] = value.T if slot.transpose else value
            del value
        variable.assign(whole)
        del whole
    for block in model.blocks[:-1]:
        if block.exit_norm is not None:
            block.exit_norm.scale.assign(final_norm)


def load_llama(
    handle: str,
    exit_layers=(),
    capacity: float = 1.0,
    dtype: str = "float32",
    load_tokenizer: bool = True,
    **overrides,
):
    """Loads a Llama checkpoint as a `HierarchicalLlama`.

    Args:
        handle: a local directory, `hf://org/name`, `kaggle://...` or a TF-Hub handle;
            or a GGUF file (`file.gguf`) or a GGUF handle (`"smollm2"`, see
            `toex_tf.loaders.gguf_file`).
        exit_layers: the exits (1-based layers) besides the final one; `()` none.
        capacity: FFN routing capacity in (0, 1]; `1.0`: no routers.
        dtype: the model's dtype policy (`"float32"`, `"bfloat16"`, ...). The weights
            are cast from the checkpoint's dtype.
        load_tokenizer: read `tokenizer.model` / `tokenizer.json` when present, into
            `model.tokenizer` (None when absent).
        **overrides: other `LlamaConfig` fields (`max_length`, `shortlist_size`,
            `gate_units`, ...).

    Returns:
        The model, base frozen. `model(token_ids)` on int32 `(batch, seq)` returns
        `{"logits": (batch, seq, vocab), "exit_logits": [...]}` (`AdaptiveModel`).
    """
    from toex_tf.loaders.gguf_file import is_gguf_source, load_gguf_llama  # noqa: PLC0415
    from toex_tf.models.llama import build_llama  # noqa: PLC0415 - models import loaders

    if is_gguf_source(handle):
        return load_gguf_llama(handle, exit_layers, capacity, dtype, load_tokenizer, **overrides)
    directory = resolve_handle(handle)
    config_path = os.path.join(directory, CONFIG_FILE)
    config = llama_config_from_hf(
        read_hf_config(directory),
        path=config_path,
        exit_layers=exit_layers,
        capacity=capacity,
        **overrides,
    )
    tensors = SafetensorsTensors(directory)  # headers only: tensors are read as assigned
    model = build_llama(config, dtype=dtype)
    assign_hf_weights(model, tensors, source=directory)
    model.tokenizer = load_llama_tokenizer(directory) if load_tokenizer else None
    if model.tokenizer is not None and model.tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(
            f"{directory}: the tokenizer has {model.tokenizer.vocab_size} tokens but the "
            f"model's vocabulary is {config.vocab_size}: they are not from the same checkpoint."
        )
    return model


def load_llama_tokenizer(directory: str):
    """The checkpoint's tokenizer, or None: `tokenizer.model` (SentencePiece) first,
    then `tokenizer.json` (the `tokenizers` library)."""
    from toex_tf.data.tokenizers import (  # noqa: PLC0415
        HFJsonTokenizer,
        SentencePieceTokenizer,
        load_tokenizer,
    )

    sentencepiece_file = os.path.join(directory, "tokenizer.model")
    if os.path.isfile(sentencepiece_file):
        return SentencePieceTokenizer(sentencepiece_file)
    json_file = os.path.join(directory, "tokenizer.json")
    if os.path.isfile(json_file):
        if _is_toex_manifest(json_file):  # written by toex_tf's Tokenizer.save
            return load_tokenizer(directory)
        return HFJsonTokenizer(json_file)
    return None


def _is_toex_manifest(path: str) -> bool:
    # toex_tf's tokenizer manifest is a small {"type": ...} object; a Hugging Face
    # tokenizer.json has "model" and no "type" at the top level.
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return False
    return isinstance(content, dict) and "type" in content and "model" not in content


def export_llama(model, directory: str, dtype: str = "float32") -> str:
    """Writes the base of `model` as a Hugging Face Llama checkpoint in `directory`.

    `config.json` plus `model.safetensors` (`dtype`: `"float32"`, `"float16"` or
    `"bfloat16"`). Routers, gates and non-final exit norms are not part of a Llama
    checkpoint; save the whole model with `model.save(...)` for those.

    Returns:
        `directory`.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16; got {dtype!r}.")
    config = model.config
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    arrays = {}  # id(variable) -> float32 array: a fused kernel is read once
    for slot in weight_table(model):
        if id(slot.variable) not in arrays:
            arrays.clear()  # the slots of one variable are adjacent
            value = np.asarray(keras.ops.convert_to_numpy(slot.variable))
            arrays[id(slot.variable)] = value.astype("float32", copy=False)
        value = arrays[id(slot.variable)][slot.region()]
        tensors[slot.key] = np.ascontiguousarray(value.T if slot.transpose else value).astype(
            ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype
        )
    hf_config = hf_config_from_llama(config, dtype)
    # Write to temporary names, then rename: an interrupted export never leaves a
    # half-written checkpoint under the real names.
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    save_file(tensors, weights_path + ".tmp", metadata={"format": "pt"})
    with open(os.path.join(directory, CONFIG_FILE + ".tmp"), "w") as f:
        json.dump(hf_config, f, indent=2)
    os.replace(weights_path + ".tmp", weights_path)
    os.replace(os.path.join(directory, CONFIG_FILE + ".tmp"), os.path.join(directory, CONFIG_FILE))
    return directory
