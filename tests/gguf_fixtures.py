"""Tiny Llama GGUF files written by the tests themselves (`gguf.GGUFWriter`).

`write_llama_gguf` stores a `transformers` Llama's weights the way llama.cpp's converter
does: llama.cpp names, Q/K rows permuted for its RoPE, and each tensor in the type asked
for. Q8_0, Q4_0, Q4_1, F16 and BF16 come from `gguf.quants.quantize`; the K-quants
(Q4_K, Q5_K, Q6_K), which `gguf` cannot quantize, are random blocks with sane scales, so
the reference (`transformers` reading the same file) sees the same weights as we do.
"""

import json

import gguf
import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from toex_tf.loaders.gguf_file import unpermute_rope_rows

Q = gguf.GGMLQuantizationType
TEXT = [
    "The quick brown fox jumps over the lazy dog. 12345 apples cost $3.50!",
    "def main(argv):\n    return sum(x ** 2 for x in argv)  # squares\n",
    "Unicode: café naïve résumé, 日本語, emoji 🙂, tabs\tand  double  spaces.",
    "Open the file, read each line, and print the lines that match the pattern.",
] * 20


def permute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's `permute` in `convert_hf_to_gguf.py` (what the loader undoes)."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def random_k_blocks(rows: int, columns: int, qtype, rng) -> np.ndarray:
    """Random bytes of a K-quant tensor `(rows, columns)` whose fp16 scales are small and
    finite, so the dequantized weights are ordinary numbers."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, columns // block_size, type_size), dtype=np.uint8)

    # Weights of order 0.05: Q4_K/Q5_K give d * scale(<64) * q(<32); Q6_K d * int8 * 32.
    high = 4e-5 if qtype == Q.Q6_K else 1e-4

    def scale():
        return np.frombuffer(np.float16(rng.uniform(high / 4, high)).tobytes(), np.uint8)

    for row in range(rows):
        for block in range(columns // block_size):
            if qtype == Q.Q6_K:  # ql, qh, int8 scales, then d
                blocks[row, block, -2:] = scale()
            else:  # Q4_K, Q5_K: d, dmin first
                blocks[row, block, 0:2] = scale()
                blocks[row, block, 2:4] = scale()
    return blocks.reshape(rows, -1)


def encode_tensor(value: np.ndarray, qtype, rng):
    """`(bytes or array, raw_dtype)` of `value` stored as `qtype` (K-quants: random)."""
    if qtype == Q.F32:
        return value.astype(np.float32), None
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K):
        return random_k_blocks(*value.shape, qtype, rng), qtype
    return gguf.quants.quantize(value.astype(np.float32), qtype), qtype


def gpt2_vocabulary(vocab_size=320):
    """A byte-level BPE trained on `TEXT`: `(tokens by id, merges, token types)`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXT, trainer)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in merges]
    types = [3 if token.startswith("<|") else 1 for token in tokens]
    return tokens, merges, types


def sentencepiece_vocabulary(directory, vocab_size=400):
    """A SentencePiece BPE (byte fallback) trained on `TEXT`: `(tokens, scores, types,
    model file)` as llama.cpp's converter stores them."""
    import sentencepiece as spm  # noqa: PLC0415

    prefix = str(directory / "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_file=prefix + ".model")
    tokens, scores, types = [], [], []
    for i in range(processor.get_piece_size()):
        tokens.append(processor.id_to_piece(i))
        scores.append(processor.get_score(i))
        if processor.is_unknown(i):
            types.append(2)
        elif processor.is_control(i):
            types.append(3)
        elif processor.is_byte(i):
            types.append(6)
        else:
            types.append(1)
    return tokens, scores, types, prefix + ".model"


def write_llama_gguf(
    path,
    hf_model,
    vocabulary,
    tensor_types=None,
    architecture="llama",
    skip_tensors=(),
    extra_tensors=None,
    metadata=None,
    seed=0,
):
    """Writes `hf_model` (a `transformers.LlamaForCausalLM`) as a llama.cpp GGUF.

    Args:
        vocabulary: `("gpt2", tokens, merges, types)` or `("llama", tokens, scores,
            types)`.
        tensor_types: `{llama.cpp name suffix or full name: GGMLQuantizationType}`;
            default F32 everywhere. A suffix such as `"attn_q.weight"` applies to every
            block.
        skip_tensors: llama.cpp names to leave out (a truncated conversion).
        extra_tensors: `{name: array}` written as they are (an unknown tensor).
        metadata: `{field: value}` replacing the config's (`"feed_forward_length"`, ...),
            for a file whose metadata does not fit its tensors.

    Returns:
        `(path, {hf key: float32 array as stored})`: K-quant tensors hold their random
        blocks' values, so a parity test compares against what the file holds.
    """
    config = hf_model.config
    rng = np.random.default_rng(seed)
    tensor_types = tensor_types or {}
    writer = gguf.GGUFWriter(str(path), architecture)
    fields = {
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        **(metadata or {}),
    }
    writer.add_block_count(fields["block_count"])
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(fields["feed_forward_length"])
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    kind, tokens, merges_or_scores, types = vocabulary
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "gpt2":
        writer.add_tokenizer_pre("gpt2")
        writer.add_token_merges(merges_or_scores)
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(0)
        writer.add_add_bos_token(False)
    else:
        writer.add_token_scores(merges_or_scores)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(True)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    block = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for layer in range(config.num_hidden_layers):
        for hf, cpp in block.items():
            names[f"model.layers.{layer}.{hf}.weight"] = f"blk.{layer}.{cpp}.weight"
    state = {key: value.detach().float().numpy() for key, value in hf_model.state_dict().items()}
    stored = {}
    for key, name in names.items():
        if name in skip_tensors:
            continue
        value = state[key]
        if name.endswith("attn_q.weight"):
            value = permute_rope_rows(value, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            value = permute_rope_rows(value, config.num_key_value_heads)
        qtype = tensor_types.get(name, tensor_types.get(name.split(".", 2)[-1], Q.F32))
        data, raw_dtype = encode_tensor(value, qtype, rng)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
        as_stored = gguf.quants.dequantize(data, qtype) if raw_dtype else data
        as_stored = np.asarray(as_stored, np.float32).reshape(value.shape)
        if name.endswith("attn_q.weight"):  # back to Hugging Face's row order
            as_stored = unpermute_rope_rows(as_stored, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            as_stored = unpermute_rope_rows(as_stored, config.num_key_value_heads)
        stored[key] = as_stored
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, np.asarray(value, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path), stored
